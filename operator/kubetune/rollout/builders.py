"""ModelDeployment children as whole manifests: Deployment, Services, PodDisruptionBudget, HTTPRoute.

Pure dict builders (STYLE.md rule 2), shared by the operator and the local runtime (docs/contracts.md,
"Shared Python interfaces"): the local runtime runs the very container command and environment
built here as a process, so nothing here may depend on being in a cluster.

Names and labels follow docs/contracts.md: ``<mdep>-<revision>`` for a revision's Deployment,
Service and PDB, ``<mdep>`` for the Service over every revision and the HTTPRoute. The pod
template carries only labels that never change during a revision's life (owner, kind, component,
revision): the *role* of a revision (stable or canary) is a label on the Deployment object only,
so promoting a canary never restarts its pods.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from kubetune.api.common import (
    LABEL_COMPONENT,
    LABEL_ENGINE,
    LABEL_KIND,
    LABEL_MANAGED_BY,
    LABEL_OWNER,
    LABEL_REVISION,
    owner_references,
)
from kubetune.api.conditions import Reason, invalid_spec_message
from kubetune.api.defaults import PodDefaults, apply_cluster_defaults
from kubetune.api.modeldeployment import KIND, ModelDeploymentSpec, VllmSpec
from kubetune.api.pods import PodTemplateError, merge_pod_template
from kubetune.api.security import IMAGE_UID, container_security_context, pod_security_context
from kubetune.rollout.revisions import ModelProblem, Revision, resource_name, server_image

# Role of a revision's Deployment (object label only, never in the pod template; see above).
LABEL_ROLE = "kubetune.io/role"
ROLE_STABLE = "stable"
ROLE_CANARY = "canary"

COMPONENT = "server"
CONTAINER = "server"
PORT_NAME = "http"
CACHE_DIR = "/cache"
# The server writes a start-up failure here as JSON ({"outcome", "message"}); the kubelet keeps
# it as the container's termination message, so a crash loop quotes the error rather than the
# last log line ("Finished server process").
TERMINATION_LOG = "/dev/termination-log"
# The server's API key (spec.server.apiKeySecret), from a secretKeyRef.
API_KEY_ENV = "KUBETUNE_API_KEY"
GATEWAY_API_VERSION = "gateway.networking.k8s.io/v1"

# Model loading can take minutes (download + load to GPU). The startup probe gives it up to
# STARTUP_FAILURES * STARTUP_PERIOD seconds before liveness applies; a pod that never becomes
# ready is still bounded by the Deployment's progressDeadlineSeconds (= the rollout's).
STARTUP_PERIOD = 5
STARTUP_FAILURES = 120
# Seconds past the server's longest drain (ServerSpec.drain_seconds) before the kubelet's
# SIGKILL: the engine's worker stops and the process exits.
EXIT_MARGIN_SECONDS = 10

# --- the vLLM engine (spec.server.engine vllm) ---------------------------------------------
#
# vLLM's image cannot read s3:// with kubetune's storage code and manifest checks, so an init
# container in the kubetune server image (`python -m kubetune_server.fetch`, the same fetch and
# digest verification the built-in server runs before loading) fills the emptyDir MODELS_DIR;
# the engine container then serves the local folders:
#   MODELS_DIR/model             the base model (or a FineTuneJob's merged weights)
#   MODELS_DIR/adapters/<name>   each LoRA adapter, served under <name>
FETCH_CONTAINER = "fetch"
MODELS_DIR = "/models"
VLLM_HEALTH = "/health"
# NCCL between tensor-parallel workers needs more shared memory than a container's 64 MiB.
SHM_DIR = "/dev/shm"


def _spec(md: Mapping[str, Any]) -> ModelDeploymentSpec:
    spec = md.get("spec")
    return (
        spec
        if isinstance(spec, ModelDeploymentSpec)
        else ModelDeploymentSpec.model_validate(spec or {})
    )


def _meta(md: Mapping[str, Any]) -> dict[str, Any]:
    return dict(md.get("metadata") or {})


def owner_labels(md: Mapping[str, Any]) -> dict[str, str]:
    """Labels every child of the ModelDeployment carries (selects all of its serving pods)."""
    return {
        LABEL_OWNER: _meta(md)["name"],
        LABEL_KIND: KIND,
        LABEL_COMPONENT: COMPONENT,
    }


def scale_selector(md: Mapping[str, Any]) -> str:
    """``status.selector`` for the scale subresource: every serving pod of the ModelDeployment.

    The same labels the shared Service selects (stable and canary pods), as the string form an
    HPA parses (``key=value,...``, sorted so that the status does not change between steps).
    """
    return ",".join(f"{k}={v}" for k, v in sorted(owner_labels(md).items()))


def revision_labels(md: Mapping[str, Any], revision: str) -> dict[str, str]:
    """Labels of one revision's pods (and its Deployment's immutable selector)."""
    return {**owner_labels(md), LABEL_REVISION: revision}


def _object_meta(md: Mapping[str, Any], name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    meta = _meta(md)
    out: dict[str, Any] = {"name": name, "labels": {**labels, LABEL_MANAGED_BY: "kubetune"}}
    if meta.get("namespace"):
        out["namespace"] = meta["namespace"]
    # Garbage collection through ownerReferences when the parent came from an API server (it
    # has a uid); the local runtime's manifests have none and need none.
    refs = owner_references(md, KIND)
    if refs:
        out["ownerReferences"] = refs
    return out


def termination_grace_seconds(spec: ModelDeploymentSpec) -> int:
    """``terminationGracePeriodSeconds`` of a serving pod: longer than the server's drain.

    On SIGTERM the server finishes requests in flight for up to ``requestTimeoutSeconds`` plus a
    margin (:attr:`ServerSpec.drain_seconds`); a shorter grace period would cut long generations
    on every scale-down and rollout (it was a fixed 30 s against a 65 s drain).
    """
    return spec.server.drain_seconds + EXIT_MARGIN_SECONDS


def server_env(md: Mapping[str, Any], revision: Revision) -> list[dict[str, Any]]:
    """The server container's environment (docs/contracts.md, "Server pod environment")."""
    spec = _spec(md)
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_MODEL_URI", "value": revision.model_uri},
        {"name": "KUBETUNE_MODEL_NAME", "value": revision.model_name},
        {"name": "KUBETUNE_REVISION", "value": revision.name},
        {"name": "KUBETUNE_SERVER_CONFIG", "value": json.dumps(spec.server.dump(), sort_keys=True)},
        {"name": "KUBETUNE_CACHE_DIR", "value": CACHE_DIR},
        {"name": "KUBETUNE_PORT", "value": str(spec.server.port)},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"},
        {"name": "KUBETUNE_TERMINATION_LOG", "value": TERMINATION_LOG},
    ]
    if revision.adapter_uri:
        env.append({"name": "KUBETUNE_ADAPTER_URI", "value": revision.adapter_uri})
    if revision.adapter_digest:
        env.append({"name": "KUBETUNE_ADAPTER_DIGEST", "value": revision.adapter_digest})
    storage = spec.storage
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    if storage.credentials_secret:
        # Keys only ever come from the Secret (DESIGN.md, storage): never inline in a spec.
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append(
                {
                    "name": key,
                    "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}},
                }
            )
    if spec.server.api_key_secret:
        # The value only ever comes from the Secret, resolved by the kubelet (never in a spec,
        # never in this manifest).
        ref = spec.server.api_key_secret
        env.append(
            {
                "name": API_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    # User extras last, so a drill can override a default (last duplicate wins in Kubernetes).
    env.extend({"name": e.name, "value": e.value} for e in spec.server.env)
    return env


def _probes(liveness: str, readiness: str) -> dict[str, Any]:
    http_get = {"port": PORT_NAME}
    return {
        "startupProbe": {
            "httpGet": {**http_get, "path": liveness},
            "periodSeconds": STARTUP_PERIOD,
            "failureThreshold": STARTUP_FAILURES,
        },
        "livenessProbe": {
            "httpGet": {**http_get, "path": liveness},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {**http_get, "path": readiness},
            "periodSeconds": 2,
            "failureThreshold": 2,
        },
    }


def served_adapters(revision: Revision) -> dict[str, str]:
    """Served name -> adapter URI of a revision (the adapter goes by the revision's model name)."""
    return {revision.model_name: revision.adapter_uri} if revision.adapter_uri else {}


def base_served_name(revision: Revision) -> str:
    """The name the bare base model is served under: the model name, or ``<name>-base`` beside an adapter.

    The built-in server's convention (kubetune_server.config.Settings.base_name), kept for vLLM
    so a client or the eval gate addresses the same names whichever engine serves them.
    """
    return f"{revision.model_name}-base" if served_adapters(revision) else revision.model_name


# vLLM accepts only these --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_folder(root: str, name: str) -> str:
    """Where the adapter served as ``name`` lies under ``root``: ``<root>/adapters/<quoted name>``.

    URL-quoted because a served name may hold '/' (``org/model``); the fetch init container
    (kubetune_server.fetch) lays the folders out with this same function.
    """
    return f"{root.rstrip('/')}/adapters/{quote(name, safe='')}"


def vllm_max_lora_rank(vllm: VllmSpec, revision: Revision) -> int | None:
    """--max-lora-rank: the spec's, else the adapter's rank rounded up to a value vLLM accepts.

    None leaves vLLM's default (16); the fetch init container checks the adapter against the
    rank vLLM will reserve (KUBETUNE_MAX_LORA_RANK) and fails with a message rather than let
    vLLM refuse the adapter at its first request.
    """
    if vllm.max_lora_rank is not None:
        return int(vllm.max_lora_rank)
    if revision.adapter_rank is None:
        return None
    for allowed in VLLM_LORA_RANKS:
        if allowed >= revision.adapter_rank:
            return allowed
    return VLLM_LORA_RANKS[-1]


def vllm_args(md: Mapping[str, Any], revision: Revision) -> list[str]:
    """``vllm serve`` arguments of a revision (the engine container's ``args``).

    The folders are the fetch init container's (MODELS_DIR); every served name matches the
    built-in server's; the tensor-parallel size is ``resources.gpus``.
    """
    spec = _spec(md)
    vllm = spec.server.vllm or VllmSpec()
    args = [
        f"{MODELS_DIR}/model",
        "--served-model-name",
        base_served_name(revision),
        "--host",
        "0.0.0.0",
        "--port",
        str(spec.server.port),
        "--tensor-parallel-size",
        str(max(1, spec.resources.gpus)),
        "--max-model-len",
        str(spec.server.max_model_len),
        "--gpu-memory-utilization",
        f"{vllm.gpu_memory_utilization:g}",
        "--dtype",
        spec.server.dtype,
    ]
    adapters = served_adapters(revision)
    if adapters:
        args += ["--enable-lora", "--max-loras", str(len(adapters))]
        rank = vllm_max_lora_rank(vllm, revision)
        if rank is not None:
            args += ["--max-lora-rank", str(rank)]
        args += ["--lora-modules"]
        args += [f"{name}={adapter_folder(MODELS_DIR, name)}" for name in sorted(adapters)]
    return args + list(vllm.extra_args)


def _vllm_env(md: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = _spec(md)
    env = [
        # Weights are local (the init container fetched them): never reach for the Hub.
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        # A read-only root filesystem: every cache vLLM, torch and Triton write goes to CACHE_DIR.
        {"name": "HOME", "value": f"{CACHE_DIR}/home"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/hf"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_DIR}/vllm"},
        {"name": "VLLM_CONFIG_ROOT", "value": f"{CACHE_DIR}/vllm-config"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        # No usage reports from inside a cluster.
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
        {"name": "DO_NOT_TRACK", "value": "1"},
    ]
    if spec.server.api_key_secret:
        # vLLM's own API-key check (VLLM_API_KEY, as --api-key): Bearer required on /v1 routes,
        # /health and /metrics open, like kubetune_server's KUBETUNE_API_KEY.
        ref = spec.server.api_key_secret
        env.append(
            {
                "name": "VLLM_API_KEY",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    env.extend({"name": e.name, "value": e.value} for e in spec.server.env)
    return env


def _containers(
    md: Mapping[str, Any], revision: Revision, image: str | None, defaults: PodDefaults | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``(initContainers, containers, volumes)`` of a revision's pods, by engine."""
    spec = _spec(md)
    res = spec.resources
    requests: dict[str, str] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, str] = {"memory": res.memory}
    gpu_requests, gpu_limits = dict(requests), dict(limits)
    if res.gpus:
        gpu_requests["nvidia.com/gpu"] = str(res.gpus)
        gpu_limits["nvidia.com/gpu"] = str(res.gpus)
    ports = [{"name": PORT_NAME, "containerPort": spec.server.port, "protocol": "TCP"}]
    volumes: list[dict[str, Any]] = [
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    base_mounts = [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if revision.engine != "vllm":
        container: dict[str, Any] = {
            "name": CONTAINER,
            "image": image or revision.image,
            "command": ["python", "-m", "kubetune_server"],
            "env": server_env(md, revision),
            "ports": ports,
            "resources": {"requests": gpu_requests, "limits": gpu_limits},
            **_probes("/healthz", "/readyz"),
            "securityContext": container_security_context(),
            "volumeMounts": base_mounts,
            "terminationMessagePath": TERMINATION_LOG,
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }
        return [], [container], volumes
    # vLLM: the kubetune server image fetches and verifies, vLLM serves.
    rank = vllm_max_lora_rank(spec.server.vllm or VllmSpec(), revision)
    # The server's environment without the API key: fetching needs the storage keys only.
    fetch_env = [e for e in server_env(md, revision) if e["name"] != API_KEY_ENV]
    fetch_env.append({"name": "KUBETUNE_FETCH_DIR", "value": MODELS_DIR})
    if served_adapters(revision):
        # What vLLM reserves (its default 16 when kubetune passes no --max-lora-rank).
        fetch_env.append({"name": "KUBETUNE_MAX_LORA_RANK", "value": str(rank or 16)})
    fetch: dict[str, Any] = {
        "name": FETCH_CONTAINER,
        "image": server_image(spec, defaults),
        "command": ["python", "-m", "kubetune_server.fetch"],
        "env": fetch_env,
        # No GPU: fetching needs none, and a GPU held by an init container idles for minutes.
        "resources": {"requests": requests, "limits": limits},
        "securityContext": container_security_context(),
        "volumeMounts": [*base_mounts, {"name": "models", "mountPath": MODELS_DIR}],
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    engine: dict[str, Any] = {
        "name": CONTAINER,
        "image": image or revision.image,
        "command": ["vllm", "serve"],
        "args": vllm_args(md, revision),
        "env": _vllm_env(md),
        "ports": ports,
        "resources": {"requests": gpu_requests, "limits": gpu_limits},
        # vLLM answers /health once the engine is up and 503 when it died; it has no separate
        # readiness endpoint, and it only listens after the weights are loaded.
        **_probes(VLLM_HEALTH, VLLM_HEALTH),
        # vLLM's image runs as root; the pod's runAsNonRoot needs a user named here (the one
        # kubetune's images use). Its caches go to CACHE_DIR (an emptyDir any user may write).
        "securityContext": {
            **container_security_context(),
            "runAsUser": IMAGE_UID,
            "runAsGroup": IMAGE_UID,
        },
        "volumeMounts": [
            *base_mounts,
            {"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
            {"name": "shm", "mountPath": SHM_DIR},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    volumes += [
        {"name": "models", "emptyDir": {}},
        {"name": "shm", "emptyDir": {"medium": "Memory"}},
    ]
    return [fetch], [engine], volumes


def build_server_deployment(
    md: Mapping[str, Any],
    revision: Revision,
    *,
    role: str,
    image: str | None = None,
    replicas: int | None = None,
    defaults: PodDefaults | None = None,
) -> dict[str, Any]:
    """apps/v1 Deployment ``<mdep>-<revision>`` running the inference server for one revision.

    ``replicas`` defaults to ``spec.replicas``; the state machine sizes canaries itself
    (``weights.canary_replicas``). ``image`` defaults to the revision's serving image
    (``spec.server.image`` or the cluster's; ``spec.server.vllm.image`` for engine vllm);
    ``defaults`` are the cluster's pod defaults (kubetune.api.defaults). The engine decides the
    containers: kubetune_server alone, or a fetch init container and vLLM (see the constants).
    """
    spec = _spec(md)
    name = resource_name(_meta(md)["name"], revision.name)
    pod_labels = revision_labels(md, revision.name)
    res = spec.resources
    init_containers, containers, volumes = _containers(md, revision, image, defaults)
    pod_spec: dict[str, Any] = {
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": containers,
        "securityContext": pod_security_context(),
        "volumes": volumes,
        # In-flight generations finish; the router already stopped sending (weight 0 first).
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "enableServiceLinks": False,
        # The server makes no Kubernetes API call: no token in the pod (workload identity
        # for S3 mounts its own projected token, independent of this setting).
        "automountServiceAccountToken": False,
    }
    if spec.account():
        pod_spec["serviceAccountName"] = spec.account()
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [s.dump() for s in spec.image_pull_secrets]
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = [t.dump() for t in res.tolerations]
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    # The engine label tells a scraper which metric map reads the pods (never in the immutable
    # selector: an engine change is a new revision anyway).
    engine_label = {LABEL_ENGINE: revision.engine}
    metadata = _object_meta(md, name, {**pod_labels, **engine_label, LABEL_ROLE: role})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": pod_labels},
            "progressDeadlineSeconds": spec.rollout.progress_deadline_seconds,
            "revisionHistoryLimit": 2,
            # Never below the desired count while a revision's own pods roll (node drains,
            # image bumps do not apply: a new image is a new revision).
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            # The platform team's podTemplate last, merged by the function both kinds share
            # (it refuses to change anything built above).
            "template": apply_cluster_defaults(
                merge_pod_template(
                    {
                        "metadata": {
                            "labels": {**pod_labels, **engine_label},
                            "annotations": {
                                "prometheus.io/scrape": "true",
                                "prometheus.io/port": str(spec.server.port),
                                "prometheus.io/path": "/metrics",
                            },
                        },
                        "spec": pod_spec,
                    },
                    spec.pod_template,
                    container=CONTAINER,
                ),
                defaults,
                gpu=res.gpus > 0,
            ),
        },
    }


def check_pod_template(
    md: Mapping[str, Any], resolved: Revision | ModelProblem, defaults: PodDefaults | None = None
) -> Revision | ModelProblem:
    """``resolved`` unless ``spec.podTemplate`` cannot be merged into its pods (then InvalidSpec).

    Both runtimes call this right after ``revisions.resolve``: the state machine then reports a
    refused override as a terminal InvalidSpec problem instead of a Deployment that fails to build.
    """
    if not isinstance(resolved, Revision):
        return resolved
    try:
        build_server_deployment(md, resolved, role=ROLE_CANARY, defaults=defaults)
    except PodTemplateError as exc:
        return ModelProblem(Reason.INVALID_SPEC, invalid_spec_message(exc), terminal=True)
    return resolved


def build_revision_service(md: Mapping[str, Any], revision: str) -> dict[str, Any]:
    """Service ``<mdep>-<revision>`` selecting one revision's pods (an HTTPRoute backend)."""
    spec = _spec(md)
    name = resource_name(_meta(md)["name"], revision)
    labels = revision_labels(md, revision)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _object_meta(md, name, labels),
        "spec": {
            "selector": labels,
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": spec.traffic.port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_stable_service(md: Mapping[str, Any]) -> dict[str, Any]:
    """Service ``<mdep>`` over the pods of every revision of this ModelDeployment.

    In ``replicas`` mode this is how traffic is split: kube-proxy spreads connections over the
    ready endpoints of both revisions, so the canary's share is its share of ready pods (see
    ``kubetune.rollout.weights``). In ``gatewayAPI`` mode the HTTPRoute carries the split and
    this Service is only the in-cluster name.
    """
    spec = _spec(md)
    labels = owner_labels(md)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _object_meta(md, _meta(md)["name"], labels),
        "spec": {
            "selector": labels,
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": spec.traffic.port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def build_pdb(md: Mapping[str, Any], revision: str) -> dict[str, Any]:
    """policy/v1 PodDisruptionBudget ``<mdep>-<revision>``: voluntary evictions one pod at a time.

    ``maxUnavailable: 1`` rather than ``minAvailable``: a single-replica revision must not block
    node drains forever.
    """
    labels = revision_labels(md, revision)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _object_meta(md, resource_name(_meta(md)["name"], revision), labels),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
    }


def build_httproute(md: Mapping[str, Any], weights: Mapping[str, int]) -> dict[str, Any]:
    """gateway.networking.k8s.io/v1 HTTPRoute ``<mdep>`` with one weighted backendRef per revision.

    ``weights`` maps revision -> weight (``weights.traffic_weights``). A weight of 0 keeps the
    backend listed with weight 0: the Gateway stops sending to it at once, and the revision's
    Service stays referenced until its pods are gone.
    """
    spec = _spec(md)
    meta = _meta(md)
    parent_refs = []
    for ref in spec.traffic.parent_refs:
        entry: dict[str, Any] = {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": ref.name,
        }
        if ref.namespace:
            entry["namespace"] = ref.namespace
        if ref.section_name:
            entry["sectionName"] = ref.section_name
        parent_refs.append(entry)
    # Every field the API server would default is written out (group "" = core, kind Service),
    # so the read-and-compare apply sees no difference on the next reconcile and never re-patches.
    backends = [
        {
            "group": "",
            "kind": "Service",
            "name": resource_name(meta["name"], rev),
            "port": spec.traffic.port,
            "weight": int(w),
        }
        for rev, w in sorted(weights.items())
    ]
    route_spec: dict[str, Any] = {
        "parentRefs": parent_refs,
        "rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/"}}], "backendRefs": backends}
        ],
    }
    if spec.traffic.hostnames:
        route_spec["hostnames"] = list(spec.traffic.hostnames)
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": _object_meta(md, meta["name"], owner_labels(md)),
        "spec": route_spec,
    }


def readiness_failure(raw: str | None) -> tuple[str, str] | None:
    """``(reason, message)`` when a server's /readyz answer says it will never become ready.

    Today one case: the adapter's manifest digest is not the one the revision was built for
    (``{"status": "failed", "reason": "AdapterDigestMismatch", "message", "foundDigest"}``).
    Both runtimes turn it into the revision's failure, so the ModelDeployment's status says
    which digest the pod found instead of waiting for the progress deadline.
    """
    try:
        doc = json.loads(raw or "")
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("reason") != Reason.ADAPTER_DIGEST_MISMATCH:
        return None
    message = doc.get("message")
    if not isinstance(message, str) or not message.strip():
        message = f"adapter digest {doc.get('foundDigest')} is not {doc.get('expectedDigest')}"
    return Reason.ADAPTER_DIGEST_MISMATCH, f"adapter digest mismatch: {message.strip()[:500]}"


def termination_text(raw: str | None) -> str | None:
    """The message of a server's termination log (JSON ``{"outcome", "message"}`` or plain text).

    Both runtimes quote it in the CrashLoopBackOff message: the start-up error ("cannot serve:
    file:///nonexistent/model: not a folder") says why, the last log line rarely does.
    """
    text = (raw or "").strip()
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return text[-500:]
    if isinstance(doc, dict) and isinstance(doc.get("message"), str) and doc["message"].strip():
        return doc["message"].strip()[:500]
    return text[-500:]
