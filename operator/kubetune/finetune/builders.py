"""Pure builders of a FineTuneJob's child objects (one builder, two runtimes).

Every function takes the whole FineTuneJob object (``metadata`` + ``spec``, the wire form) and
returns complete manifests as plain dicts. The operator sends them to the API server; the local
runtime runs the same pod templates as processes (docs/contracts.md, "Shared Python
interfaces"). Nothing here does I/O or imports Kubernetes clients.

Children (docs/contracts.md, "Child object names and labels"):

- ``<ftj>-validate``: CPU Job running ``python -m kubetune_trainer validate``.
- ``<ftj>-train``: the training Job (GPU); one name for every attempt, ``kubetune.io/attempt``
  says which attempt a Job object belongs to. ``nodes > 1`` makes it an Indexed Job whose pods
  find each other through the headless Service ``<ftj>-train`` (torchrun rendezvous).
- ``<ftj>-trainer``: ServiceAccount, Role and RoleBinding of the progress channel; the Role may
  only ``get``/``patch`` the ``status`` of this one FineTuneJob (``resourceNames``).
"""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.common import (
    API_VERSION,
    LABEL_COMPONENT,
    LABEL_KIND,
    LABEL_MANAGED_BY,
    LABEL_OWNER,
    owner_references,
)
from kubetune.api.defaults import PodDefaults, apply_cluster_defaults
from kubetune.api.finetunejob import KIND, PLURAL, FineTuneJobSpec
from kubetune.api.pods import merge_pod_template
from kubetune.api.security import container_security_context, pod_security_context

# --- names, labels, annotations ----------------------------------------------------------------

LABEL_ATTEMPT = "kubetune.io/attempt"
ANNOTATION_ATTEMPT = "kubetune.io/attempt"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
COMPONENT_VALIDATE = "validate"
COMPONENT_TRAIN = "train"
COMPONENT_TRAINER_RBAC = "trainer"

TERMINATION_LOG = "/dev/termination-log"
WORK_DIR = "/tmp/kubetune"
HF_HOME = "/cache/hf"
MASTER_PORT = 29500
GPU_RESOURCE = "nvidia.com/gpu"

# The validator streams JSONL line by line and tokenises it: a small CPU pod is enough, and it
# never waits for a GPU (the whole point of validating first).
VALIDATE_CPU = "1"
VALIDATE_MEMORY = "4Gi"
# Seconds between SIGTERM and SIGKILL: the trainer saves a checkpoint (and uploads it) in this
# window (DESIGN.md, checkpoint contract: "SIGTERM = save a checkpoint within the grace period").
TRAIN_GRACE_SECONDS = 300
VALIDATE_GRACE_SECONDS = 30


def validate_job_name(ftj: dict[str, Any]) -> str:
    """``<ftj>-validate``."""
    return f"{ftj['metadata']['name']}-validate"


def train_job_name(ftj: dict[str, Any]) -> str:
    """``<ftj>-train`` (also the headless Service's name when ``nodes > 1``)."""
    return f"{ftj['metadata']['name']}-train"


def trainer_account_name(ftj: dict[str, Any]) -> str:
    """``<ftj>-trainer``: ServiceAccount, Role and RoleBinding of the progress channel."""
    return f"{ftj['metadata']['name']}-trainer"


def parse_spec(ftj: dict[str, Any]) -> FineTuneJobSpec:
    """The spec with every default filled (pydantic validation; raises on a malformed spec)."""
    return FineTuneJobSpec.model_validate(ftj.get("spec") or {})


def owner_labels(ftj: dict[str, Any], component: str) -> dict[str, str]:
    """Labels every child carries: owner, kind, component, managed-by."""
    return {
        LABEL_OWNER: ftj["metadata"]["name"],
        LABEL_KIND: KIND,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: "kubetune",
    }


def _metadata(
    ftj: dict[str, Any], name: str, component: str, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {**owner_labels(ftj, component), **(extra_labels or {})},
    }
    namespace = ftj["metadata"].get("namespace")
    if namespace:
        meta["namespace"] = namespace
    refs = owner_references(ftj, KIND)
    if refs:
        meta["ownerReferences"] = refs
    return meta


# --- the pod template ----------------------------------------------------------------------------


def trainer_env(
    ftj: dict[str, Any], spec: FineTuneJobSpec, *, attempt: int, report: str
) -> list[dict[str, Any]]:
    """The trainer environment of docs/contracts.md ("Trainer pod environment")."""
    meta = ftj["metadata"]
    env: list[dict[str, Any]] = [
        {
            "name": "KUBETUNE_SPEC",
            "value": json.dumps(spec.dump(), sort_keys=True, separators=(",", ":")),
        },
        {"name": "KUBETUNE_JOB_NAME", "value": meta["name"]},
        {"name": "KUBETUNE_NAMESPACE", "value": meta.get("namespace") or "default"},
        {"name": "KUBETUNE_JOB_UID", "value": meta.get("uid") or ""},
        {"name": "KUBETUNE_ATTEMPT", "value": str(attempt)},
        {"name": "KUBETUNE_REPORT", "value": report},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": TERMINATION_LOG},
        {"name": "KUBETUNE_WORK_DIR", "value": WORK_DIR},
        {"name": "HF_HOME", "value": HF_HOME},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    storage = spec.storage
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    if storage.credentials_secret:
        # Keys only ever come from the Secret (DESIGN.md, storage): the spec holds its name.
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        ):
            ref: dict[str, Any] = {"name": storage.credentials_secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _volumes(shm: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # Read-only root filesystem: everything the trainer writes goes to emptyDirs.
    volumes = [
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
    ]
    mounts = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
    ]
    if shm:
        # NB: PyTorch data loaders and NCCL use /dev/shm; the container runtime's 64 MiB default
        # is far too small for multi-GPU training.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _service_account_fields(ftj: dict[str, Any], report: str) -> dict[str, Any]:
    # The per-job ServiceAccount carries the progress-channel Role (and, copied from
    # spec.storage.serviceAccountName, the workload-identity annotations for the bucket).
    # The local runtime has no ServiceAccounts and reports through a file instead.
    if report == "k8s":
        return {
            "serviceAccountName": trainer_account_name(ftj),
            "automountServiceAccountToken": True,
        }
    return {"automountServiceAccountToken": False}


def _platform_pod(
    spec: FineTuneJobSpec,
    template: dict[str, Any],
    container: str,
    defaults: PodDefaults | None,
    gpu: bool = False,
) -> dict[str, Any]:
    # The platform team's part of the pod, last: image pull secrets, then spec.podTemplate
    # merged by the one function both kinds share (it refuses to change what was built above),
    # then the cluster defaults where the spec left a field unset (kubetune.api.defaults).
    if spec.image_pull_secrets:
        template["spec"]["imagePullSecrets"] = [s.dump() for s in spec.image_pull_secrets]
    merged = merge_pod_template(template, spec.pod_template, container=container)
    return apply_cluster_defaults(merged, defaults, gpu=gpu)


def trainer_image(
    spec: FineTuneJobSpec, image: str | None = None, defaults: PodDefaults | None = None
) -> str:
    """The image of both Jobs: the explicit override, else spec.image, else the cluster's."""
    return image or spec.image or (defaults or PodDefaults()).trainer_image


# --- Jobs ----------------------------------------------------------------------------------------


def build_validate_job(
    ftj: dict[str, Any],
    *,
    image: str | None = None,
    report: str = "k8s",
    defaults: PodDefaults | None = None,
) -> dict[str, Any]:
    """batch/v1 Job ``<ftj>-validate``: the CPU data validation (``python -m kubetune_trainer validate``).

    ``image`` overrides ``spec.image`` and ``defaults`` are the cluster's (chart values);
    ``report`` is the progress channel (``k8s``,
    ``file:///path.json`` or ``none``). The validator writes the data report under
    ``<output>/data/`` and its summary to the termination message; exit 2 means the data is
    unusable, so the Job's pod failure policy fails at once instead of retrying.
    """
    spec = parse_spec(ftj)
    volumes, mounts = _volumes(shm=False)
    container = {
        "name": "validate",
        "image": trainer_image(spec, image, defaults),
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "kubetune_trainer", "validate"],
        "env": trainer_env(ftj, spec, attempt=0, report=report)
        + [{"name": "KUBETUNE_IMAGE", "value": trainer_image(spec, image, defaults)}],
        "resources": {
            "requests": {"cpu": VALIDATE_CPU, "memory": VALIDATE_MEMORY},
            "limits": {"memory": VALIDATE_MEMORY},
        },
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    labels = owner_labels(ftj, COMPONENT_VALIDATE)
    pod_spec = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": VALIDATE_GRACE_SECONDS,
        "securityContext": pod_security_context(),
        **_service_account_fields(ftj, report),
        "containers": [container],
        "volumes": volumes,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(ftj, validate_job_name(ftj), COMPONENT_VALIDATE),
        "spec": {
            # One retry for infrastructure trouble (node lost, storage hiccup); exit 2 (bad data
            # or config) fails the Job at once through the pod failure policy.
            "backoffLimit": 1,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "validate",
                            "operator": "In",
                            "values": [2],
                        },
                    },
                    {
                        "action": "Ignore",
                        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
                    },
                ]
            },
            "template": _platform_pod(
                spec, {"metadata": {"labels": labels}, "spec": pod_spec}, "validate", defaults
            ),
        },
    }


def _train_command(spec: FineTuneJobSpec) -> list[str]:
    gpus = spec.resources.gpus
    if spec.nodes > 1:
        # $(VAR) is expanded by the kubelet from the container's env.
        return [
            "torchrun",
            "--nnodes=$(NNODES)",
            "--nproc-per-node=$(NPROC_PER_NODE)",
            "--node-rank=$(NODE_RANK)",
            "--master-addr=$(MASTER_ADDR)",
            "--master-port=$(MASTER_PORT)",
            "-m",
            "kubetune_trainer",
            "train",
        ]
    if gpus > 1:
        return [
            "torchrun",
            "--standalone",
            f"--nproc-per-node={gpus}",
            "-m",
            "kubetune_trainer",
            "train",
        ]
    return ["python", "-m", "kubetune_trainer", "train"]


def _rendezvous_env(ftj: dict[str, Any], spec: FineTuneJobSpec) -> list[dict[str, Any]]:
    if spec.nodes == 1 and spec.resources.gpus <= 1:
        return []
    nproc = str(max(spec.resources.gpus, 1))
    if spec.nodes == 1:
        return [
            {"name": "MASTER_ADDR", "value": "127.0.0.1"},
            {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
            {"name": "NNODES", "value": "1"},
            {"name": "NPROC_PER_NODE", "value": nproc},
            {"name": "NODE_RANK", "value": "0"},
        ]
    name = train_job_name(ftj)
    namespace = ftj["metadata"].get("namespace") or "default"
    # Indexed Job pods are named <job>-<index> and, with subdomain <service>, resolvable as
    # <job>-<index>.<service>.<namespace>.svc: index 0 is the rendezvous master.
    return [
        {"name": "MASTER_ADDR", "value": f"{name}-0.{name}.{namespace}.svc"},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(spec.nodes)},
        {"name": "NPROC_PER_NODE", "value": nproc},
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                }
            },
        },
    ]


def build_train_job(
    ftj: dict[str, Any],
    *,
    attempt: int,
    image: str | None = None,
    report: str = "k8s",
    defaults: PodDefaults | None = None,
) -> dict[str, Any]:
    """batch/v1 Job ``<ftj>-train`` for training attempt ``attempt`` (0 first).

    The Job never retries by itself (``backoffLimit: 0``): the operator counts restarts on the
    FineTuneJob (they survive Job deletion), waits ``retry.backoffSeconds`` and creates the Job
    again with the next attempt; the trainer resumes from the newest complete checkpoint.
    With ``queueName`` the Job is created suspended with the Kueue queue label (Kueue admits it
    by unsuspending); ``nodes > 1`` makes it an Indexed Job (see :func:`build_train_service`).
    """
    spec = parse_spec(ftj)
    res = spec.resources
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"memory": res.memory}
    if res.gpus > 0:
        requests[GPU_RESOURCE] = str(res.gpus)
        limits[GPU_RESOURCE] = str(res.gpus)
    volumes, mounts = _volumes(shm=res.gpus > 0)
    container = {
        "name": "trainer",
        "image": trainer_image(spec, image, defaults),
        "imagePullPolicy": "IfNotPresent",
        "command": _train_command(spec),
        "env": trainer_env(ftj, spec, attempt=attempt, report=report)
        + [{"name": "KUBETUNE_IMAGE", "value": trainer_image(spec, image, defaults)}]
        + _rendezvous_env(ftj, spec),
        "resources": {"requests": requests, "limits": limits},
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if spec.nodes > 1:
        container["ports"] = [
            {"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}
        ]
    tolerations = [t.dump() for t in res.tolerations]
    if res.gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in tolerations):
        # GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule (GKE, EKS, the GPU operator).
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TRAIN_GRACE_SECONDS,
        "securityContext": pod_security_context(),
        **_service_account_fields(ftj, report),
        "containers": [container],
        "volumes": volumes,
    }
    if res.gpu_node_selector:
        pod_spec["nodeSelector"] = dict(res.gpu_node_selector)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    extra_labels = {LABEL_ATTEMPT: str(attempt)}
    job_labels = dict(extra_labels)
    if spec.queue_name:
        job_labels[LABEL_KUEUE_QUEUE] = spec.queue_name
    metadata = _metadata(ftj, train_job_name(ftj), COMPONENT_TRAIN, job_labels)
    metadata["annotations"] = {ANNOTATION_ATTEMPT: str(attempt)}
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,
        "template": {
            "metadata": {"labels": {**owner_labels(ftj, COMPONENT_TRAIN), **extra_labels}},
            "spec": pod_spec,
        },
    }
    if spec.nodes > 1:
        pod_spec["subdomain"] = train_job_name(ftj)
        job_spec.update(completionMode="Indexed", completions=spec.nodes, parallelism=spec.nodes)
    job_spec["template"] = _platform_pod(
        spec, job_spec["template"], "trainer", defaults, gpu=res.gpus > 0
    )
    if spec.queue_name:
        # Kueue admits a queued Job by flipping suspend to false.
        job_spec["suspend"] = True
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def build_train_service(ftj: dict[str, Any]) -> dict[str, Any]:
    """Headless Service ``<ftj>-train`` giving the Indexed Job's pods stable DNS names (nodes > 1)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ftj, train_job_name(ftj), COMPONENT_TRAIN),
        "spec": {
            "clusterIP": "None",
            # Pods must resolve each other before they are Ready (rendezvous happens first).
            "publishNotReadyAddresses": True,
            "selector": {LABEL_OWNER: ftj["metadata"]["name"], LABEL_COMPONENT: COMPONENT_TRAIN},
            "ports": [
                {
                    "name": "rendezvous",
                    "port": MASTER_PORT,
                    "targetPort": MASTER_PORT,
                    "protocol": "TCP",
                }
            ],
        },
    }


def check_pod_template(ftj: dict[str, Any], defaults: PodDefaults | None = None) -> None:
    """Raise PodTemplateError when ``spec.podTemplate`` cannot be merged into either Job's pod."""
    build_validate_job(ftj, defaults=defaults)
    build_train_job(ftj, attempt=0, defaults=defaults)


# --- RBAC of the progress channel ----------------------------------------------------------------


def build_trainer_rbac(
    ftj: dict[str, Any],
    *,
    service_account_annotations: dict[str, str] | None = None,
    image_pull_secrets: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """ServiceAccount, Role and RoleBinding ``<ftj>-trainer`` (cluster only).

    The Role allows ``get`` and ``patch`` of exactly this FineTuneJob's ``status`` (DESIGN.md,
    progress channel): a compromised trainer can touch nothing else. Workload-identity
    annotations (IRSA, GKE WI) and the ``imagePullSecrets`` of ``spec.serviceAccountName`` are
    passed in by the caller, which reads that ServiceAccount: the per-job account stands in for
    it, so what a platform team attached to its account (a registry secret) applies here too.
    """
    name = trainer_account_name(ftj)
    sa_meta = _metadata(ftj, name, COMPONENT_TRAINER_RBAC)
    if service_account_annotations:
        sa_meta["annotations"] = dict(service_account_annotations)
    account: dict[str, Any] = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": sa_meta}
    if image_pull_secrets:
        account["imagePullSecrets"] = [{"name": s["name"]} for s in image_pull_secrets if s.get("name")]
    group = API_VERSION.split("/")[0]
    return [
        account,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _metadata(ftj, name, COMPONENT_TRAINER_RBAC),
            "rules": [
                {
                    "apiGroups": [group],
                    "resources": [f"{PLURAL}/status"],
                    "resourceNames": [ftj["metadata"]["name"]],
                    "verbs": ["get", "patch"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _metadata(ftj, name, COMPONENT_TRAINER_RBAC),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": name,
                    "namespace": ftj["metadata"].get("namespace") or "default",
                }
            ],
        },
    ]
