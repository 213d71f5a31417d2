"""Shared pieces of the API: the base model class, metadata, small reusable sub-objects.

Every model uses camelCase field names on the wire (``learningRate``) and snake_case in Python
(``learning_rate``). Unknown fields are an error: a cluster would silently prune a misspelt
field, so the local runtime and ``kubetune validate`` refuse it and say where it is.
"""

from __future__ import annotations

from typing import Any, Literal

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
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
ANNOTATION_PROMOTE = "kubetune.io/promote"
ANNOTATION_ABORT = "kubetune.io/abort"
ANNOTATION_PAUSE = "kubetune.io/pause"
ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"


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

    key: str | None = Field(default=None, description="Taint key the toleration applies to; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default Equal).")
    value: str | None = Field(default=None, description="Taint value the toleration matches (with operator Equal).")
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
    credentials_secret: str | None = Field(
        default=None,
        description=(
            "Name of a Secret in the same namespace with keys AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY. Leave empty to use the pod's workload identity."
        ),
    )
    service_account_name: str | None = Field(
        default=None,
        description=(
            "ServiceAccount whose workload identity (IRSA / GKE WI annotation) grants bucket access. "
            "For FineTuneJobs the operator copies its annotations to the per-job ServiceAccount."
        ),
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
