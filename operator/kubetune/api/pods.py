"""What a platform team may change in the pods kubetune builds, and the one function that merges it.

Both kinds carry ``spec.podTemplate`` (:class:`PodTemplate`). Every builder (the validate and
train Jobs of a FineTuneJob, the serving Deployment of a ModelDeployment; the operator and the
local runtime alike) builds its pod from the spec first and then calls
:func:`merge_pod_template` once. The rules (docs/training.md, "Pod overrides"):

- **added**: labels, annotations, nodeSelector keys, tolerations, affinity, topology spread
  constraints, priorityClassName, volumes, volume mounts and env of kubetune's container,
  sidecars (native sidecar containers: ``initContainers`` with ``restartPolicy: Always``, so a
  Job still completes when the trainer exits and the sidecar starts first);
- **refused** (a validation error naming the field, never silently dropped): anything that
  would change what kubetune itself set. That is the container's command/args and image (no
  field for them), the pod and container security context (no field; a sidecar may not loosen
  kubetune's), every ``KUBETUNE_*`` variable and every variable kubetune sets (HF_HOME,
  AWS_*, torchrun's rendezvous), kubetune-owned labels and annotations (``kubetune.io/``, the
  Job controller's ``batch.kubernetes.io/``, ``job-name``, ...), the volume names and mount
  paths kubetune uses, its container names, and a nodeSelector key or priorityClassName that
  the spec's own ``resources`` already sets to another value.

The refusals exist twice, on purpose: as static lists here (the CRD's CEL rules and the pydantic
validators check them, so ``kubectl apply`` and ``kubetune validate`` refuse a bad override at
once) and derived from the built pod inside :func:`merge_pod_template` (so whatever a builder
sets is protected even if a list here were forgotten; a unit test holds the lists to a
superset of what the builders set).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from kubetune.api.common import (
    DNS1123_SUBDOMAIN_PATTERN,
    MAX_LABEL_LENGTH,
    MAX_SUBDOMAIN_LENGTH,
    LabelValue,
    Model,
    Toleration,
    cel,
    validations,
)

# --- what kubetune owns -------------------------------------------------------------------

RESERVED_LABEL_PREFIXES = ("kubetune.io/", "batch.kubernetes.io/")
# Set by kubetune (managed-by) or by the Job and Deployment controllers on the pods they create.
RESERVED_LABELS = (
    "app.kubernetes.io/managed-by",
    "job-name",
    "controller-uid",
    "pod-template-hash",
)
RESERVED_ANNOTATION_PREFIXES = ("kubetune.io/", "batch.kubernetes.io/")
RESERVED_ENV_PREFIX = "KUBETUNE_"
# Every variable a builder sets apart from KUBETUNE_*: the object-store client, the Hugging Face
# cache, torchrun's rendezvous. Set them through the spec field that owns them (storage, nodes).
RESERVED_ENV = (
    "HF_HOME",
    "PYTHONUNBUFFERED",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MASTER_ADDR",
    "MASTER_PORT",
    "NNODES",
    "NPROC_PER_NODE",
    "NODE_RANK",
)
RESERVED_VOLUMES = ("tmp", "cache", "dshm")
# The API server's ServiceAccount admission adds a projected token volume of this prefix.
RESERVED_VOLUME_PREFIX = "kube-api-access-"
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
RESERVED_MOUNT_PATHS = ("/tmp", "/cache", "/dev/shm", SERVICE_ACCOUNT_MOUNT)
RESERVED_CONTAINERS = ("trainer", "validate", "server")

MAX_ITEMS = 32
MAX_MAP = 64
MAX_NAME = 253

ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# A label or annotation key: optional DNS-subdomain prefix and '/', then a name of at most 63.
KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{i}'" for i in items) + "]"


def _no_prefix(var: str, prefixes: tuple[str, ...]) -> str:
    return " && ".join(f"!{var}.startsWith('{p}')" for p in prefixes)


def reserved_label(key: str) -> bool:
    """Whether a pod label key belongs to kubetune or a Kubernetes controller."""
    return key.startswith(RESERVED_LABEL_PREFIXES) or key in RESERVED_LABELS


def reserved_env(name: str) -> bool:
    """Whether an environment variable of kubetune's container is kubetune's own."""
    return name.startswith(RESERVED_ENV_PREFIX) or name in RESERVED_ENV


def _check_keys(mapping: dict[str, str], field: str) -> list[str]:
    import re

    return [
        f"{field}[{key!r}]: not a valid key (an optional DNS subdomain prefix and '/', then at "
        "most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        for key in mapping
        if len(key) > MAX_SUBDOMAIN_LENGTH + 1 + MAX_LABEL_LENGTH
        or not re.fullmatch(KEY_PATTERN, key)
    ]


# --- the schema ---------------------------------------------------------------------------


class LocalObjectReference(Model):
    """A reference to an object in the same namespace (an image pull Secret)."""

    name: str = Field(
        description="Name of the object.",
        pattern=DNS1123_SUBDOMAIN_PATTERN,
        max_length=MAX_SUBDOMAIN_LENGTH,
    )


class KeySelector(Model):
    """A key of a Secret or ConfigMap in the pod's namespace."""

    name: str = Field(
        description="Name of the Secret or ConfigMap.",
        pattern=DNS1123_SUBDOMAIN_PATTERN,
        max_length=MAX_NAME,
    )
    key: str = Field(description="The key to read.", min_length=1, max_length=MAX_NAME)
    optional: bool | None = Field(
        default=None, description="Whether the Secret/ConfigMap or key may be missing."
    )


class FieldSelector(Model):
    """A field of the pod (downward API), e.g. metadata.name or spec.nodeName."""

    field_path: str = Field(
        description="Path of the field, e.g. metadata.labels['team'].",
        min_length=1,
        max_length=MAX_NAME,
    )
    api_version: str | None = Field(
        default=None, description="Version of the schema the path is in (default v1)."
    )


class ResourceFieldSelector(Model):
    """A resource limit or request of the container (downward API)."""

    resource: str = Field(
        description="e.g. limits.memory, requests.cpu.", min_length=1, max_length=MAX_NAME
    )
    container_name: str | None = Field(default=None, description="Container (default: this one).")
    divisor: str | None = Field(default=None, description="Output unit (a quantity).")


class EnvVarSource(Model):
    """Where an extra variable's value comes from (exactly one)."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "[has(self.secretKeyRef), has(self.configMapKeyRef), has(self.fieldRef), "
                "has(self.resourceFieldRef)].filter(x, x).size() == 1",
                "set exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef",
            )
        )
    }
    secret_key_ref: KeySelector | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeySelector | None = Field(
        default=None, description="A key of a ConfigMap."
    )
    field_ref: FieldSelector | None = Field(default=None, description="A field of the pod.")
    resource_field_ref: ResourceFieldSelector | None = Field(
        default=None, description="A resource of the container."
    )

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        sources = [
            self.secret_key_ref,
            self.config_map_key_ref,
            self.field_ref,
            self.resource_field_ref,
        ]
        if sum(s is not None for s in sources) != 1:
            raise ValueError(
                "set exactly one of secretKeyRef, configMapKeyRef, fieldRef, resourceFieldRef"
            )
        return self


ENV_RULE = cel(
    f"!self.name.startsWith('{RESERVED_ENV_PREFIX}') && !(self.name in {_cel_list(RESERVED_ENV)})",
    f"is set by kubetune: {RESERVED_ENV_PREFIX}* and {', '.join(RESERVED_ENV)} come from the "
    "spec (storage, nodes, resources) and may not be overridden",
    ".name",
)


class EnvVar(Model):
    """An extra environment variable of kubetune's container (not one kubetune sets)."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            ENV_RULE,
            cel("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"),
        )
    }
    name: str = Field(description="Variable name.", pattern=ENV_NAME_PATTERN, max_length=MAX_NAME)
    value: str | None = Field(default=None, description="Value.")
    value_from: EnvVarSource | None = Field(
        default=None, description="Value from a Secret, ConfigMap or the pod."
    )

    @model_validator(mode="after")
    def _rules(self) -> EnvVar:
        if reserved_env(self.name):
            raise ValueError(f"name {self.name!r}: {ENV_RULE['message']}")
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"{self.name}: set value or valueFrom, not both")
        return self


class VolumeMount(Model):
    """A volume mounted into a container."""

    name: str = Field(
        description="Name of a volume of the pod.",
        pattern=DNS1123_LABEL_PATTERN,
        max_length=MAX_LABEL_LENGTH,
    )
    mount_path: str = Field(
        description="Absolute path in the container.", pattern=r"^/", max_length=1024
    )
    sub_path: str | None = Field(
        default=None, description="Path inside the volume (default: its root).", max_length=1024
    )
    read_only: bool | None = Field(default=None, description="Mount read-only.")


VOLUME_SOURCES = (
    "emptyDir",
    "secret",
    "configMap",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
    "csi",
    "ephemeral",
    "nfs",
)
VOLUME_NAME_RULE = cel(
    f"!(self.name in {_cel_list(RESERVED_VOLUMES)}) && !self.name.startsWith('{RESERVED_VOLUME_PREFIX}')",
    f"is a volume name kubetune uses ({', '.join(RESERVED_VOLUMES)}, {RESERVED_VOLUME_PREFIX}*); choose another name",
    ".name",
)


def _source_field(description: str) -> Any:
    return Field(default=None, description=description + " (core/v1, as in a pod spec).")


class Volume(Model):
    """An extra volume of the pod: a name and exactly one source (core/v1 volume sources)."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            VOLUME_NAME_RULE,
            cel(
                "["
                + ", ".join(f"has(self.{s})" for s in VOLUME_SOURCES)
                + "].filter(x, x).size() == 1",
                f"set exactly one volume source: {', '.join(VOLUME_SOURCES)}",
            ),
        )
    }
    name: str = Field(
        description="Volume name (DNS-1123 label).",
        pattern=DNS1123_LABEL_PATTERN,
        max_length=MAX_LABEL_LENGTH,
    )
    empty_dir: dict[str, Any] | None = _source_field("emptyDir")
    secret: dict[str, Any] | None = _source_field("secret")
    config_map: dict[str, Any] | None = _source_field("configMap")
    persistent_volume_claim: dict[str, Any] | None = _source_field("persistentVolumeClaim")
    projected: dict[str, Any] | None = _source_field("projected")
    downward_api: dict[str, Any] | None = Field(
        default=None, alias="downwardAPI", description="downwardAPI (core/v1, as in a pod spec)."
    )
    csi: dict[str, Any] | None = _source_field("csi")
    ephemeral: dict[str, Any] | None = _source_field("ephemeral")
    nfs: dict[str, Any] | None = _source_field("nfs")

    @model_validator(mode="after")
    def _rules(self) -> Volume:
        if self.name in RESERVED_VOLUMES or self.name.startswith(RESERVED_VOLUME_PREFIX):
            raise ValueError(f"name {self.name!r}: {VOLUME_NAME_RULE['message']}")
        present = [s for s in VOLUME_SOURCES if self.dump().get(s) is not None]
        if len(present) != 1:
            raise ValueError(
                f"volume {self.name!r}: set exactly one volume source ({', '.join(VOLUME_SOURCES)}), got {present or 'none'}"
            )
        return self


class Capabilities(Model):
    """Linux capabilities of a sidecar."""

    add: list[str] | None = Field(
        default=None,
        description="Capabilities to add: refused (kubetune drops them all).",
        max_length=MAX_ITEMS,
    )
    drop: list[str] | None = Field(
        default=None, description="Capabilities to drop.", max_length=MAX_ITEMS
    )


SIDECAR_SECURITY_RULES = (
    cel(
        "!has(self.privileged) || !self.privileged",
        "a sidecar may not be privileged",
        ".privileged",
    ),
    cel(
        "!has(self.allowPrivilegeEscalation) || !self.allowPrivilegeEscalation",
        "a sidecar may not allow privilege escalation",
        ".allowPrivilegeEscalation",
    ),
    cel(
        "!has(self.runAsNonRoot) || self.runAsNonRoot",
        "a sidecar must run as non-root",
        ".runAsNonRoot",
    ),
    cel(
        "!has(self.runAsUser) || self.runAsUser != 0",
        "a sidecar may not run as root (UID 0)",
        ".runAsUser",
    ),
    cel(
        "!has(self.capabilities) || !has(self.capabilities.add) || self.capabilities.add.size() == 0",
        "a sidecar may not add capabilities",
        ".capabilities.add",
    ),
)


class SidecarSecurityContext(Model):
    """A sidecar's own security context: it starts from kubetune's container's and may tighten it.

    Whatever kubetune's container sets and the sidecar leaves out is copied over; loosening it
    (privileged, privilege escalation, root, added capabilities) is refused.
    """

    model_config = Model.model_config | {"json_schema_extra": validations(*SIDECAR_SECURITY_RULES)}
    run_as_user: int | None = Field(default=None, ge=0, description="UID (not 0).")
    run_as_group: int | None = Field(default=None, ge=0, description="GID.")
    run_as_non_root: bool | None = Field(default=None, description="Must stay true.")
    read_only_root_filesystem: bool | None = Field(
        default=None, description="A sidecar may write to its root filesystem."
    )
    allow_privilege_escalation: bool | None = Field(default=None, description="Must stay false.")
    privileged: bool | None = Field(default=None, description="Must stay false.")
    capabilities: Capabilities | None = Field(default=None, description="Only drop is allowed.")
    seccomp_profile: dict[str, Any] | None = Field(
        default=None, description="Seccomp profile (core/v1)."
    )

    @model_validator(mode="after")
    def _rules(self) -> SidecarSecurityContext:
        problems = sidecar_security_problems(self.dump())
        if problems:
            raise ValueError("; ".join(problems))
        return self


def sidecar_security_problems(context: dict[str, Any]) -> list[str]:
    """Why a sidecar's security context loosens kubetune's (empty: it does not)."""
    problems = []
    if context.get("privileged"):
        problems.append("privileged: a sidecar may not be privileged")
    if context.get("allowPrivilegeEscalation"):
        problems.append("allowPrivilegeEscalation: a sidecar may not allow privilege escalation")
    if context.get("runAsNonRoot") is False:
        problems.append("runAsNonRoot: a sidecar must run as non-root")
    if context.get("runAsUser") == 0:
        problems.append("runAsUser: a sidecar may not run as root (UID 0)")
    if (context.get("capabilities") or {}).get("add"):
        problems.append("capabilities.add: a sidecar may not add capabilities")
    return problems


SIDECAR_NAME_RULE = cel(
    f"!(self.name in {_cel_list(RESERVED_CONTAINERS)})",
    f"is a container name kubetune uses ({', '.join(RESERVED_CONTAINERS)})",
    ".name",
)


class Sidecar(Model):
    """An extra container (core/v1 Container) run as a native sidecar beside kubetune's container.

    ``name`` and ``image`` are required; ``securityContext`` and ``volumeMounts`` are checked;
    every other Container field (command, args, env, ports, resources, probes) is passed as is.
    """

    model_config = ConfigDict(
        alias_generator=Model.model_config["alias_generator"],
        populate_by_name=True,
        extra="allow",
        validate_default=True,
        json_schema_extra=validations(SIDECAR_NAME_RULE),
    )
    name: str = Field(
        description="Container name (DNS-1123 label).",
        pattern=DNS1123_LABEL_PATTERN,
        max_length=MAX_LABEL_LENGTH,
    )
    image: str = Field(description="Container image.", min_length=1, max_length=1024)
    security_context: SidecarSecurityContext | None = Field(
        default=None,
        description="Tightens kubetune's container security context (copied when left out).",
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Volumes of the pod (kubetune's or podTemplate.volumes) to mount.",
    )
    restart_policy: Literal["Always"] | None = Field(
        default=None,
        description="Always (a native sidecar); kubetune sets it, another value is refused.",
    )

    @model_validator(mode="after")
    def _rules(self) -> Sidecar:
        if self.name in RESERVED_CONTAINERS:
            raise ValueError(f"name {self.name!r}: {SIDECAR_NAME_RULE['message']}")
        return self


LABEL_RULE = cel(
    "self.all(k, "
    + _no_prefix("k", RESERVED_LABEL_PREFIXES)
    + ") && "
    + " && ".join(f"!('{k}' in self)" for k in RESERVED_LABELS),
    f"kubetune and the Job/Deployment controllers own the label keys {', '.join(p + '*' for p in RESERVED_LABEL_PREFIXES)}"
    f" and {', '.join(RESERVED_LABELS)}; choose other keys",
)
ANNOTATION_RULE = cel(
    "self.all(k, " + _no_prefix("k", RESERVED_ANNOTATION_PREFIXES) + ")",
    f"kubetune and the Job controller own the annotation keys {', '.join(p + '*' for p in RESERVED_ANNOTATION_PREFIXES)}; choose other keys",
)
MOUNT_PATH_RULE = cel(
    f"self.all(m, !(m.mountPath in {_cel_list(RESERVED_MOUNT_PATHS)}))",
    f"kubetune's container already mounts {', '.join(RESERVED_MOUNT_PATHS)}; mount elsewhere",
)
MOUNT_REF_RULE = cel(
    f"self.volumeMounts.all(m, m.name in {_cel_list(RESERVED_VOLUMES)} || self.volumes.exists(v, v.name == m.name))"
    f" && self.sidecars.all(s, s.volumeMounts.all(m, m.name in {_cel_list(RESERVED_VOLUMES)} || self.volumes.exists(v, v.name == m.name)))",
    "every volumeMount must name a volume of podTemplate.volumes (or one of kubetune's: "
    + ", ".join(RESERVED_VOLUMES)
    + ")",
)


class Affinity(Model):
    """Pod affinity (core/v1 Affinity): the three kinds, each passed as written."""

    node_affinity: dict[str, Any] | None = Field(default=None, description="core/v1 NodeAffinity.")
    pod_affinity: dict[str, Any] | None = Field(default=None, description="core/v1 PodAffinity.")
    pod_anti_affinity: dict[str, Any] | None = Field(
        default=None, description="core/v1 PodAntiAffinity."
    )


class TopologySpreadConstraint(Model):
    """core/v1 TopologySpreadConstraint."""

    max_skew: int = Field(
        ge=1, description="Largest allowed difference in matching pods between domains."
    )
    topology_key: str = Field(
        description="Node label that defines the domains, e.g. topology.kubernetes.io/zone.",
        min_length=1,
        max_length=317,
    )
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"] = Field(
        description="DoNotSchedule or ScheduleAnyway."
    )
    label_selector: dict[str, Any] | None = Field(
        default=None, description="Pods counted (core/v1 LabelSelector)."
    )
    min_domains: int | None = Field(
        default=None, ge=1, description="Minimum number of eligible domains."
    )
    match_label_keys: list[str] | None = Field(
        default=None,
        max_length=MAX_ITEMS,
        description="Pod label keys whose values narrow the selector.",
    )
    node_affinity_policy: Literal["Honor", "Ignore"] | None = Field(
        default=None, description="Honor or Ignore."
    )
    node_taints_policy: Literal["Honor", "Ignore"] | None = Field(
        default=None, description="Honor or Ignore."
    )


def _map_list(key: str) -> dict[str, Any]:
    # A list keyed by one field: the API server refuses two items with the same key.
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]}


class PodTemplate(Model):
    """Changes to the pods kubetune builds (merged by kubetune.api.pods.merge_pod_template).

    Everything here is added to what kubetune builds; nothing replaces a value kubetune sets
    (see the module docstring for what is refused).
    """

    model_config = Model.model_config | {"json_schema_extra": validations(MOUNT_REF_RULE)}
    labels: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_MAP,
        description="Extra pod labels (not kubetune.io/*, batch.kubernetes.io/*, job-name, controller-uid, pod-template-hash, app.kubernetes.io/managed-by).",
        json_schema_extra=validations(LABEL_RULE),
    )
    annotations: dict[str, str] = Field(
        default_factory=dict,
        max_length=MAX_MAP,
        description="Extra pod annotations (not kubetune.io/*, batch.kubernetes.io/*).",
        json_schema_extra=validations(ANNOTATION_RULE),
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_MAP,
        description="Extra node labels the pods must match (a key the spec's resources also set must have the same value).",
    )
    affinity: Affinity | None = Field(
        default=None, description="Node affinity, pod affinity and anti-affinity."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Extra tolerations (added to kubetune's).",
    )
    topology_spread_constraints: list[TopologySpreadConstraint] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="How the pods spread over zones or nodes.",
    )
    priority_class_name: str | None = Field(
        default=None,
        description="PriorityClass of the pods (must agree with resources.priorityClassName when both are set).",
        pattern=DNS1123_SUBDOMAIN_PATTERN,
        max_length=MAX_SUBDOMAIN_LENGTH,
    )
    volumes: list[Volume] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Extra volumes (not named tmp, cache, dshm).",
        json_schema_extra=_map_list("name"),
    )
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list,
        max_length=MAX_ITEMS,
        description="Extra mounts of kubetune's container (not at /tmp, /cache, /dev/shm).",
        json_schema_extra=_map_list("mountPath") | validations(MOUNT_PATH_RULE),
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=MAX_MAP,
        description="Extra environment of kubetune's container (not KUBETUNE_* nor a variable kubetune sets).",
        json_schema_extra=_map_list("name"),
    )
    sidecars: list[Sidecar] = Field(
        default_factory=list,
        max_length=8,
        description="Extra containers, run as native sidecars (initContainers with restartPolicy Always, Kubernetes 1.29+).",
        json_schema_extra=_map_list("name"),
    )

    @model_validator(mode="after")
    def _rules(self) -> PodTemplate:
        problems = _check_keys(self.labels, "labels") + _check_keys(self.annotations, "annotations")
        problems += _check_keys(self.node_selector, "nodeSelector")
        problems += [
            f"labels[{k!r}]: {LABEL_RULE['message']}" for k in self.labels if reserved_label(k)
        ]
        problems += [
            f"annotations[{k!r}]: {ANNOTATION_RULE['message']}"
            for k in self.annotations
            if k.startswith(RESERVED_ANNOTATION_PREFIXES)
        ]
        problems += [
            f"volumeMounts[{i}].mountPath: {MOUNT_PATH_RULE['message']}"
            for i, m in enumerate(self.volume_mounts)
            if m.mount_path in RESERVED_MOUNT_PATHS
        ]
        names = {v.name for v in self.volumes} | set(RESERVED_VOLUMES)
        mounts = [(f"volumeMounts[{i}]", m) for i, m in enumerate(self.volume_mounts)]
        for j, sidecar in enumerate(self.sidecars):
            mounts += [
                (f"sidecars[{j}].volumeMounts[{i}]", m) for i, m in enumerate(sidecar.volume_mounts)
            ]
        problems += [
            f"{where}.name: no volume {m.name!r}: {MOUNT_REF_RULE['message']}"
            for where, m in mounts
            if m.name not in names
        ]
        for field, items, key in (
            ("volumes", self.volumes, "name"),
            ("volumeMounts", self.volume_mounts, "mount_path"),
            ("env", self.env, "name"),
            ("sidecars", self.sidecars, "name"),
        ):
            seen: set[str] = set()
            for i, item in enumerate(items):
                value = getattr(item, key)
                if value in seen:
                    problems.append(f"{field}[{i}]: duplicate {value!r}")
                seen.add(value)
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --- spec-level rules (the podTemplate against the spec's own fields) ---------------------


def spec_rules(resources_selector: str) -> tuple[dict[str, Any], ...]:
    """CEL rules of a spec with ``podTemplate`` and ``resources.<resources_selector>``."""
    return (
        cel(
            "!has(self.podTemplate) || !has(self.podTemplate.priorityClassName) || "
            "!has(self.resources.priorityClassName) || "
            "self.podTemplate.priorityClassName == self.resources.priorityClassName",
            "podTemplate.priorityClassName differs from resources.priorityClassName; set it in one place",
            ".podTemplate.priorityClassName",
        ),
        cel(
            f"!has(self.podTemplate) || self.podTemplate.nodeSelector.all(k, !(k in self.resources.{resources_selector}) "
            f"|| self.resources.{resources_selector}[k] == self.podTemplate.nodeSelector[k])",
            f"podTemplate.nodeSelector sets a key of resources.{resources_selector} to another value; set it in one place",
            ".podTemplate.nodeSelector",
        ),
    )


def spec_problems(
    template: PodTemplate | None,
    node_selector: dict[str, str],
    priority_class: str | None,
    selector_field: str,
) -> list[str]:
    """spec_rules in Python (the operator's and the local runtime's parse of the spec)."""
    if template is None:
        return []
    problems = []
    if (
        template.priority_class_name
        and priority_class
        and template.priority_class_name != priority_class
    ):
        problems.append(
            f"podTemplate.priorityClassName: {template.priority_class_name!r} differs from "
            f"resources.priorityClassName {priority_class!r}; set it in one place"
        )
    for key, value in template.node_selector.items():
        if key in node_selector and node_selector[key] != value:
            problems.append(
                f"podTemplate.nodeSelector[{key!r}]: {value!r} differs from resources.{selector_field}"
                f"[{key!r}] {node_selector[key]!r}; set it in one place"
            )
    return problems


# --- the merge ------------------------------------------------------------------------------


class PodTemplateError(ValueError):
    """An override that would change what kubetune set; ``problems`` name the fields."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("; ".join(f"{path}.{p}" for p in problems))


def merge_pod_template(
    template: dict[str, Any],
    override: PodTemplate | None,
    *,
    container: str,
    path: str = "spec.podTemplate",
) -> dict[str, Any]:
    """The pod template (``{"metadata", "spec"}``) with ``override`` merged in, as a new dict.

    ``container`` names kubetune's container (env and volumeMounts go there). Raises
    :class:`PodTemplateError` listing every override that would change a value kubetune set;
    the built template is never modified.
    """
    out = copy.deepcopy(template)
    if override is None:
        return out
    meta = out.setdefault("metadata", {})
    pod = out["spec"]
    main = next(c for c in pod["containers"] if c["name"] == container)
    problems: list[str] = []

    labels = meta.setdefault("labels", {})
    for key, value in override.labels.items():
        if reserved_label(key) or key in labels:
            problems.append(f"labels[{key!r}]: kubetune sets this label; choose another key")
        else:
            labels[key] = value
    annotations = meta.get("annotations") or {}
    for key, value in override.annotations.items():
        if key.startswith(RESERVED_ANNOTATION_PREFIXES) or key in annotations:
            problems.append(
                f"annotations[{key!r}]: kubetune sets this annotation; choose another key"
            )
        else:
            annotations[key] = value
    if annotations:
        meta["annotations"] = annotations

    selector = pod.get("nodeSelector") or {}
    for key, value in override.node_selector.items():
        if selector.get(key, value) != value:
            problems.append(
                f"nodeSelector[{key!r}]: {value!r} differs from {selector[key]!r} set by the spec's resources; set it in one place"
            )
        selector[key] = value
    if selector:
        pod["nodeSelector"] = selector
    tolerations = pod.get("tolerations") or []
    for toleration in override.tolerations:
        item = toleration.dump()
        if item not in tolerations:
            tolerations.append(item)
    if tolerations:
        pod["tolerations"] = tolerations
    if override.affinity is not None:
        affinity = pod.get("affinity") or {}
        for key, value in override.affinity.dump().items():
            if key in affinity:
                problems.append(f"affinity.{key}: kubetune sets it for this pod")
            else:
                affinity[key] = value
        if affinity:
            pod["affinity"] = affinity
    if override.topology_spread_constraints:
        pod["topologySpreadConstraints"] = pod.get("topologySpreadConstraints", []) + [
            t.dump() for t in override.topology_spread_constraints
        ]
    if override.priority_class_name:
        current = pod.get("priorityClassName")
        if current and current != override.priority_class_name:
            problems.append(
                f"priorityClassName: {override.priority_class_name!r} differs from {current!r} set by "
                "resources.priorityClassName; set it in one place"
            )
        pod["priorityClassName"] = override.priority_class_name

    volumes = pod.setdefault("volumes", [])
    volume_names = {v["name"] for v in volumes}
    for i, volume in enumerate(override.volumes):
        if (
            volume.name in volume_names
            or volume.name in RESERVED_VOLUMES
            or volume.name.startswith(RESERVED_VOLUME_PREFIX)
        ):
            problems.append(
                f"volumes[{i}].name: kubetune uses the volume name {volume.name!r}; choose another"
            )
        volume_names.add(volume.name)
        volumes.append(volume.dump())

    def check_mounts(mounts: list[VolumeMount], where: str) -> None:
        for i, mount in enumerate(mounts):
            if mount.name not in volume_names:
                problems.append(f"{where}[{i}].name: no volume {mount.name!r} in the pod")

    check_mounts(override.volume_mounts, "volumeMounts")
    main_mounts = main.setdefault("volumeMounts", [])
    taken = {m["mountPath"] for m in main_mounts} | set(RESERVED_MOUNT_PATHS)
    for i, mount in enumerate(override.volume_mounts):
        if mount.mount_path in taken:
            problems.append(
                f"volumeMounts[{i}].mountPath: kubetune's container already mounts {mount.mount_path}"
            )
        taken.add(mount.mount_path)
        main_mounts.append(mount.dump())

    env = main.setdefault("env", [])
    set_names = {e["name"] for e in env}
    for i, var in enumerate(override.env):
        if reserved_env(var.name) or var.name in set_names:
            problems.append(f"env[{i}].name: kubetune sets {var.name}; it may not be overridden")
        set_names.add(var.name)
        env.append(var.dump())

    containers = {c["name"] for c in pod["containers"] + pod.get("initContainers", [])}
    base_security = main.get("securityContext") or {}
    for i, sidecar in enumerate(override.sidecars):
        if sidecar.name in containers or sidecar.name in RESERVED_CONTAINERS:
            problems.append(
                f"sidecars[{i}].name: kubetune uses the container name {sidecar.name!r}"
            )
        containers.add(sidecar.name)
        check_mounts(sidecar.volume_mounts, f"sidecars[{i}].volumeMounts")
        spec = sidecar.dump()
        own = spec.get("securityContext") or {}
        problems += [f"sidecars[{i}].securityContext.{p}" for p in sidecar_security_problems(own)]
        # Start from kubetune's container's context: a sidecar that says nothing runs as
        # hardened as the trainer/server does (a restricted namespace admits the pod).
        spec["securityContext"] = {**copy.deepcopy(base_security), **own}
        if not spec["volumeMounts"]:
            spec.pop("volumeMounts")
        # Native sidecar: started before kubetune's container, stopped after it; a Job
        # completes when its regular containers exit.
        spec["restartPolicy"] = "Always"
        pod.setdefault("initContainers", []).append(spec)

    if problems:
        raise PodTemplateError(path, problems)
    return out
