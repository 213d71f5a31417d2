"""Shared pieces of the API: the base model class, metadata, small reusable sub-objects.

Every model uses camelCase field names on the wire (``learningRate``) and snake_case in Python
(``learning_rate``). Unknown fields are an error: a cluster would silently prune a misspelt
field, so the local runtime and ``kubetune validate`` refuse it and say where it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Label and annotation keys live under kubetune.io/ and are constants (STYLE.md, rule 6).
LABEL_OWNER = "kubetune.io/owner"
LABEL_KIND = "kubetune.io/kind"
LABEL_COMPONENT = "kubetune.io/component"
LABEL_REVISION = "kubetune.io/revision"
# Serving engine of a revision's pods (builtin, vllm): which metric map reads their /metrics.
LABEL_ENGINE = "kubetune.io/engine"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ANNOTATION_PROMOTE = "kubetune.io/promote"
ANNOTATION_ABORT = "kubetune.io/abort"
ANNOTATION_PAUSE = "kubetune.io/pause"
ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"


def owner_references(parent: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """The controller ownerReference to ``parent`` (what ``kopf.adopt`` adds), when it has a uid.

    Every child of a FineTuneJob or ModelDeployment carries it, so the API server's garbage
    collector deletes the children with their parent. Built here rather than with ``kopf.adopt``
    so that the builders' manifests are complete and the same in both runtimes; the local
    runtime's objects have no uid and get none (its store deletes children itself).
    """
    meta = parent.get("metadata") or {}
    if not meta.get("uid"):
        return []
    return [
        {
            "apiVersion": API_VERSION,
            "kind": kind,
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


# --- names and label values ------------------------------------------------------------------
#
# Whatever a user writes that ends up as a Kubernetes name or label value of a child object must
# obey the rules the API server applies to that child, or the parent is accepted and its child
# refused (apimachinery's IsDNS1123Label, IsDNS1035Label, IsDNS1123Subdomain, IsValidLabelValue,
# IsQualifiedName). The patterns go into the CRD schema (``pattern`` + ``maxLength``), so the API
# server and ``kubetune validate`` enforce them alike; PATTERN_MEANINGS words them for people.

MAX_LABEL_LENGTH = 63  # a DNS-1123/1035 label, a label value, the name part of a label key
MAX_SUBDOMAIN_LENGTH = 253
DNS1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A label key (a toleration's key), or empty: an optional DNS subdomain prefix and "/", then a
# name of at most 63 characters. The prefix's own 253 limit is approximated by the maxLength.
LABEL_KEY_OR_EMPTY_PATTERN = (
    r"^(([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$"
)
MAX_LABEL_KEY_LENGTH = MAX_SUBDOMAIN_LENGTH + 1 + MAX_LABEL_LENGTH

PATTERN_MEANINGS = {
    DNS1035_LABEL_PATTERN: (
        "a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and ending "
        "with a letter or digit"
    ),
    DNS1123_SUBDOMAIN_PATTERN: (
        "a Kubernetes object name (DNS-1123 subdomain): lowercase letters, digits, '-' and '.', "
        "starting and ending with a letter or digit, at most 253 characters"
    ),
    LABEL_VALUE_PATTERN: (
        "a Kubernetes label value: at most 63 characters, letters, digits, '-', '_' and '.', "
        "starting and ending with a letter or digit; or empty"
    ),
    LABEL_KEY_OR_EMPTY_PATTERN: (
        "a Kubernetes label key: an optional DNS subdomain prefix and '/', then at most 63 "
        "letters, digits, '-', '_' or '.', starting and ending with a letter or digit; or empty"
    ),
}


def name_ref_field(description: str, **kwargs: Any) -> Any:
    """An optional field naming another Kubernetes object (a DNS-1123 subdomain)."""
    return Field(
        default=None,
        description=description,
        pattern=DNS1123_SUBDOMAIN_PATTERN,
        max_length=MAX_SUBDOMAIN_LENGTH,
        **kwargs,
    )


# A string that becomes a label value (validated as one; nodeSelector values, toleration values).
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=MAX_LABEL_LENGTH)]


class Model(BaseModel):
    """Base of every API object: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None):
    """One ``x-kubernetes-validations`` entry (a CEL rule with a message a user understands)."""
    entry: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


def validations(*rules: dict[str, Any]) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules for a model or a field."""
    return {"x-kubernetes-validations": list(rules)}


class ObjectMeta(Model):
    """The subset of ObjectMeta kubetune reads. Other metadata fields are kept as they are."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    name: str = Field(
        description="Object name (DNS-1123 subdomain).",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        max_length=63,
    )
    namespace: str | None = Field(default=None, description="Namespace of the object.")
    labels: dict[str, str] | None = Field(default=None, description="Labels.")
    annotations: dict[str, str] | None = Field(default=None, description="Annotations.")
    generation: int | None = Field(default=None, description="Spec generation (set by the API server).")
    uid: str | None = Field(default=None, description="UID (set by the API server).")


class Toleration(Model):
    """A Kubernetes pod toleration (core/v1 Toleration)."""

    key: str | None = Field(
        default=None,
        description="Taint key the toleration applies to (a label key); empty matches all keys.",
        pattern=LABEL_KEY_OR_EMPTY_PATTERN,
        max_length=MAX_LABEL_KEY_LENGTH,
    )
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(
        default=None,
        description="Taint value the toleration matches (with operator Equal; a label value).",
        pattern=LABEL_VALUE_PATTERN,
        max_length=MAX_LABEL_LENGTH,
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="With NoExecute: how long the pod stays bound after the taint appears."
    )


class StorageConfig(Model):
    """How to reach the S3-compatible object store behind s3:// URIs.

    Credentials are never written in a spec: they come from a Secret (keys AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY, optionally AWS_SESSION_TOKEN) or, when no Secret is named, from the
    pod's workload identity (IRSA, GKE Workload Identity, EKS Pod Identity).
    """

    endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL for non-AWS stores (MinIO, Ceph, R2), e.g. http://minio.storage:9000.",
        pattern=r"^https?://",
    )
    region: str | None = Field(default=None, description="Region of the bucket, e.g. us-east-1.")
    credentials_secret: str | None = name_ref_field(
        "Name of a Secret in the same namespace with keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY. Leave empty to use the pod's workload identity."
    )
    service_account_name: str | None = name_ref_field(
        "ServiceAccount whose workload identity (IRSA / GKE WI annotation) grants bucket access. "
        "For FineTuneJobs the operator copies its annotations to the per-job ServiceAccount."
    )


class Condition(Model):
    """A Kubernetes condition (metav1.Condition semantics)."""

    type: str = Field(description="Condition type, e.g. Succeeded, Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase machine-readable reason.")
    message: str = Field(default="", description="Human-readable details.")
    last_transition_time: str | None = Field(
        default=None, description="When status last flipped (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation the condition was computed from."
    )


URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|file:///.*)$"
URI_DESCRIPTION = "s3://bucket/prefix (S3-compatible store, see storage) or file:///absolute/path (local runtime)."
