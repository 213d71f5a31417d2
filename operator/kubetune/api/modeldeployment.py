"""ModelDeployment: serve a base model plus adapter and roll every new revision out as a canary.

A revision is a stable hash of everything that changes the serving pods (DESIGN.md). The first
revision goes straight to stable; every later one walks ``rollout.steps`` as the canary.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubetune.api.common import (
    API_VERSION,
    DNS1035_LABEL_PATTERN,
    DNS1123_SUBDOMAIN_PATTERN,
    MAX_LABEL_LENGTH,
    MAX_SUBDOMAIN_LENGTH,
    URI_DESCRIPTION,
    URI_PATTERN,
    Condition,
    LabelValue,
    Model,
    ObjectMeta,
    StorageConfig,
    Toleration,
    cel,
    name_ref_field,
    validations,
)
from kubetune.api.pods import LocalObjectReference, PodTemplate, spec_problems, spec_rules

KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SHORT_NAMES = ["mdep"]

DEFAULT_SERVER_IMAGE = "ghcr.io/kubetune/server:0.1.0"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"

# The scale subresource (kubectl scale, HPA, KEDA): spec.replicas is the desired count of the
# stable revision; status.replicas its pods now; status.selector every serving pod's labels.
SCALE_SUBRESOURCE = {
    "specReplicasPath": ".spec.replicas",
    "statusReplicasPath": ".status.replicas",
    "labelSelectorPath": ".status.selector",
}

# --- names of the children ----------------------------------------------------------------
#
# Children are named from metadata.name (kubetune.rollout.builders): per revision a Deployment,
# a Service and a PodDisruptionBudget <name>-<revision> (revision: REVISION_HASH_LENGTH hex
# digits), and the Service and HTTPRoute <name>. A Service's name must be a DNS-1035 label (at
# most 63, starting with a letter, no dots): 63 - len("-") - 10 = 52. A Deployment's pods add a
# pod-template-hash and a random suffix, but the ReplicaSet controller truncates generated pod
# names, so only the Deployment's own name counts; kubetune.io/owner=<name> is a label value.
# A test builds every child with the longest allowed name and checks it against these rules.
REVISION_HASH_LENGTH = 10
NAME_MAX_LENGTH = MAX_LABEL_LENGTH - 1 - REVISION_HASH_LENGTH
NAME_RULES = (
    cel(
        f"self.metadata.name.size() <= {NAME_MAX_LENGTH}",
        f"must be at most {NAME_MAX_LENGTH} characters: each revision gets a Service "
        f"'<name>-<revision>' ({REVISION_HASH_LENGTH}-character revision hash), and a Service "
        "name must fit in 63 characters",
        ".metadata.name",
    ),
    cel(
        f"self.metadata.name.matches('{DNS1035_LABEL_PATTERN}')",
        "must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter; "
        "no '.'): it names the Services '<name>' and '<name>-<revision>'",
        ".metadata.name",
    ),
)


class LocalObjectRef(Model):
    """A reference to an object in the same namespace."""

    name: str = Field(description="Name of the object.", min_length=1)


class UriRef(Model):
    """A model or adapter location."""

    uri: str = Field(description=URI_DESCRIPTION, pattern=URI_PATTERN)
    revision: str | None = Field(
        default=None,
        description="Optional revision label, recorded in status. Written as a manifest digest (sha256:...), it is enforced: a server whose adapter has another digest stays unready (AdapterDigestMismatch).",
    )


class ModelSource(Model):
    """What to serve: a FineTuneJob's artifact, or explicit base model and adapter URIs."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "has(self.fineTuneJobRef) != has(self.baseModel)",
                "set exactly one model source: model.fineTuneJobRef or model.baseModel",
            ),
            cel(
                "!has(self.adapter) || has(self.baseModel)",
                "model.adapter goes with model.baseModel (a fineTuneJobRef brings its own adapter)",
                ".adapter",
            ),
        )
    }
    fine_tune_job_ref: LocalObjectRef | None = Field(
        default=None,
        description="Serve the artifact of this FineTuneJob (its base model plus the published adapter). Nothing is deployed until it has Succeeded.",
    )
    base_model: UriRef | None = Field(
        default=None, description="Base model weights (Hugging Face-format folder)."
    )
    adapter: UriRef | None = Field(
        default=None, description="Optional LoRA adapter to serve over baseModel."
    )
    name: str | None = Field(
        default=None,
        description="Model name clients send in the request's model field (default: the ModelDeployment's name).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
    )


class EnvVar(Model):
    """An extra environment variable of the server container (e.g. KUBETUNE_FAULT_ERROR_RATE)."""

    name: str = Field(description="Variable name.", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    value: str = Field(default="", description="Value.")


# Seconds the server's SIGTERM drain waits past requestTimeoutSeconds (ServerSpec.drain_seconds).
DRAIN_MARGIN_SECONDS = 5


class SecretKeySelector(Model):
    """One key of a Secret in the ModelDeployment's namespace."""

    name: str = Field(
        description="Secret name.",
        pattern=DNS1123_SUBDOMAIN_PATTERN,
        max_length=MAX_SUBDOMAIN_LENGTH,
    )
    key: str = Field(
        default="apiKey",
        description="Key inside the Secret.",
        pattern=r"^[-._a-zA-Z0-9]+$",
        max_length=253,
    )


# vLLM's OpenAI-compatible server image, pinned (a tag, never latest: the image is part of the
# revision, so a moving tag would change what a revision serves without a new canary).
DEFAULT_VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"


class VllmSpec(Model):
    """Settings of the vLLM engine (server.engine vllm); every field is part of the revision."""

    image: str = Field(
        default=DEFAULT_VLLM_IMAGE,
        description="vLLM OpenAI-server image the engine container runs (`vllm serve`).",
        min_length=1,
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Share of each GPU's memory vLLM may use for weights, activations and KV cache (--gpu-memory-utilization).",
    )
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = Field(
        default=None,
        description="Largest LoRA rank vLLM reserves room for (--max-lora-rank). Default: the adapter's rank when the FineTuneJob that trained it says it (rounded up to a value vLLM accepts), else vLLM's 16; the fetch init container refuses an adapter of a larger rank with a clear message.",
    )
    extra_args: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list,
        max_length=32,
        description="Further `vllm serve` flags, appended as they are (e.g. --enforce-eager). Flags kubetune sets itself are refused.",
        json_schema_extra=validations(
            cel(
                "self.all(a, !a.startsWith('--port') && !a.startsWith('--host') && "
                "!a.startsWith('--served-model-name') && !a.startsWith('--lora-modules') && "
                "!a.startsWith('--tensor-parallel-size') && !a.startsWith('--max-model-len') && "
                "!a.startsWith('--gpu-memory-utilization') && !a.startsWith('--max-lora-rank'))",
                "vllm.extraArgs may not set --port, --host, --served-model-name, --lora-modules, "
                "--tensor-parallel-size, --max-model-len, --gpu-memory-utilization or "
                "--max-lora-rank: kubetune sets them from server.port, model.name, the adapter, "
                "resources.gpus, server.maxModelLen and server.vllm",
            ),
        ),
    )


class ServerSpec(Model):
    """Inference server settings: the engine (kubetune_server or vLLM, both OpenAI-compatible) and how it serves."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.vllm) || (has(self.engine) && self.engine == 'vllm')",
                "server.vllm applies to server.engine vllm only",
                ".vllm",
            ),
        )
    }

    engine: Literal["builtin", "vllm"] = Field(
        default="builtin",
        description="builtin: kubetune_server (CPU or one GPU, tests, small models); vllm: vLLM's OpenAI-compatible server with the adapter as a LoRA module, tensor-parallel over resources.gpus (needs GPUs). Part of the revision.",
    )
    vllm: VllmSpec | None = Field(
        default=None, description="vLLM settings (engine vllm; defaults apply when omitted)."
    )
    image: str | None = Field(
        default=None,
        description=(
            "kubetune server image: the server container (engine builtin), or the init container "
            "that fetches and verifies the weights (engine vllm). Default: the operator's (chart "
            "value defaults.serverImage, else " + DEFAULT_SERVER_IMAGE + "). Part of the revision."
        ),
        min_length=1,
    )
    max_batch_size: int = Field(
        default=8,
        ge=1,
        le=1024,
        description="Requests batched into one forward pass (builtin; vLLM schedules its own continuous batches).",
    )
    batch_wait_ms: int = Field(
        default=10,
        ge=0,
        le=1000,
        description="How long an idle batcher waits for a burst of requests (two or more queued) to fill a batch; a lone request starts at once, and later ones join a running batch between decode steps (builtin).",
    )
    max_queue: int = Field(
        default=64,
        ge=1,
        le=100000,
        description="Queued requests before 429 Too Many Requests (builtin).",
    )
    max_model_len: int = Field(
        default=2048,
        ge=16,
        description="Context limit: prompt plus generated tokens (vllm: --max-model-len).",
    )
    max_tokens_limit: int = Field(
        default=512, ge=1, description="Largest max_tokens a request may ask for (builtin)."
    )
    request_timeout_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description="Per-request timeout (builtin). It also bounds the drain on SIGTERM (requests in flight get this long plus 5 s), so serving pods get terminationGracePeriodSeconds = requestTimeoutSeconds + 15.",
    )
    merge_adapter: bool = Field(
        default=False,
        description="Merge the adapter into the weights at load (faster, one adapter only). With engine vllm: serve a FineTuneJob's published merged weights when it has them, else the adapter as a LoRA module.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weights dtype (vllm: --dtype)."
    )
    port: int = Field(
        default=8000, ge=1, le=65535, description="Container port of the HTTP API and /metrics."
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=64,
        description="Extra environment of the server container (fault injection for drills: KUBETUNE_FAULT_ERROR_RATE, KUBETUNE_FAULT_LATENCY_MS, builtin only; VLLM_* variables for vllm). Part of the revision.",
    )
    api_key_secret: SecretKeySelector | None = Field(
        default=None,
        description="Require an API key: requests to /v1/ need 'Authorization: Bearer <key>' with the value of this Secret key (401 otherwise); /healthz, /readyz and /metrics stay open. The pod reads it through secretKeyRef; the key never appears in the spec, status or logs. The eval gate and `kubetune local traffic` send it.",
    )

    @property
    def drain_seconds(self) -> int:
        """Longest SIGTERM drain of the server: the request timeout plus a margin.

        The server's graceful shutdown waits this long for requests in flight; the serving
        pod's grace period is derived from it (rollout.builders.termination_grace_seconds).
        """
        return self.request_timeout_seconds + DRAIN_MARGIN_SECONDS


class ServeResources(Model):
    """Compute for each serving pod."""

    gpus: int = Field(
        default=1, ge=0, le=16, description="nvidia.com/gpu per pod (0 serves on CPU)."
    )
    cpu: str = Field(
        default="2", description="CPU request per pod.", pattern=r"^[0-9]+(\.[0-9]+)?m?$"
    )
    memory: str = Field(
        default="16Gi",
        description="Memory request and limit per pod.",
        pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[eE][0-9]+)?$",
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for tainted nodes."
    )
    priority_class_name: str | None = name_ref_field("PriorityClass of the serving pods.")


class ParentRef(Model):
    """A Gateway the HTTPRoute attaches to."""

    name: str = Field(description="Gateway name.")
    namespace: str | None = Field(
        default=None, description="Gateway namespace (default: the ModelDeployment's)."
    )
    section_name: str | None = Field(default=None, description="Listener name on the Gateway.")


class TrafficSpec(Model):
    """How traffic is split between the stable and canary revisions."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                # has() guards: the API server also runs this rule on the schema's default ({}),
                # whose nested defaults are not filled in (it refused the CRD without them).
                "!has(self.mode) || self.mode != 'gatewayAPI' || (has(self.parentRefs) && size(self.parentRefs) > 0)",
                "traffic.mode gatewayAPI needs at least one traffic.parentRefs entry (the Gateway to attach the HTTPRoute to)",
                ".parentRefs",
            ),
        )
    }

    mode: Literal["auto", "gatewayAPI", "replicas"] = Field(
        default="auto",
        description="gatewayAPI: weighted HTTPRoute backendRefs; replicas: one Service over both revisions, split by replica count; auto: gatewayAPI when the cluster serves HTTPRoute.",
    )
    parent_refs: list[ParentRef] = Field(
        default_factory=list, description="Gateways for the HTTPRoute (gatewayAPI mode)."
    )
    hostnames: list[str] = Field(default_factory=list, description="Hostnames of the HTTPRoute.")
    port: int = Field(default=80, ge=1, le=65535, description="Service port.")


class PauseStep(Model):
    """Wait a duration, or until promoted when no duration is given."""

    duration: str | None = Field(
        default=None,
        description="e.g. 30s, 5m; empty waits for kubetune.io/promote=true.",
        pattern=DURATION_PATTERN,
    )


class AnalysisStep(Model):
    """Run analysis for a number of intervals before moving on."""

    intervals: int = Field(
        default=1, ge=1, le=1000, description="Successful analysis intervals required."
    )


class RolloutStep(Model):
    """One canary step: exactly one of setWeight, pause, analysis."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "(has(self.setWeight) ? 1 : 0) + (has(self.pause) ? 1 : 0) + (has(self.analysis) ? 1 : 0) == 1",
                "each rollout step sets exactly one of setWeight, pause, analysis",
            ),
        )
    }
    set_weight: int | None = Field(
        default=None, ge=1, le=100, description="Percent of traffic for the canary."
    )
    pause: PauseStep | None = Field(
        default=None, description="Pause, for a duration or until promoted."
    )
    analysis: AnalysisStep | None = Field(
        default=None, description="Hold until this many analysis intervals pass."
    )


class Thresholds(Model):
    """Absolute limits and limits relative to stable. Unset limits are not checked."""

    max_error_rate: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Largest share of 5xx responses."
    )
    max_p95_latency_seconds: float | None = Field(
        default=None, gt=0, description="Largest p95 request latency."
    )
    max_ttft_p95_seconds: float | None = Field(
        default=None, gt=0, description="Largest p95 time to first token."
    )
    max_error_rate_increase: float | None = Field(
        default=0.02,
        ge=0.0,
        le=1.0,
        description="Canary error rate may exceed stable's by at most this much.",
    )
    max_latency_ratio: float | None = Field(
        default=1.5,
        gt=0,
        description="Canary p95 latency may be at most this multiple of stable's; the"
        " sequential test also holds each request's latency and time per output token (decoding"
        " speed) to this multiple of stable's p99.",
    )


class PrometheusProvider(Model):
    """Analysis through Prometheus instead of scraping pods.

    By default the operator reads each revision's cumulative counters (the engine's metric
    map) from Prometheus (series labelled ``namespace`` and ``revision``; the chart's PodMonitor
    gives both) and judges them exactly as the built-in provider does: pooling, the sequential
    latency test, starvation. Any of the four query templates switches to the figures they
    return, judged interval by interval as they are.
    """

    address: str = Field(
        description="Prometheus base URL, e.g. http://prometheus.monitoring:9090.",
        pattern=r"^https?://",
    )
    error_rate_query: str | None = Field(
        default=None,
        description=(
            "PromQL template for the error rate; {{revision}}, {{namespace}} and {{interval}} are"
            " substituted. Setting any template judges each interval alone on the"
            " templates' figures (no pooling, no sequential latency test); unset ones default to"
            " the metric map of the revision's engine."
        ),
    )
    latency_p95_query: str | None = Field(
        default=None, description="PromQL template for p95 latency (seconds) over {{interval}}."
    )
    ttft_p95_query: str | None = Field(
        default=None,
        description="PromQL template for p95 time to first token (seconds) over {{interval}}.",
    )
    requests_query: str | None = Field(
        default=None, description="PromQL template for the request count over {{interval}}."
    )


class AnalysisSpec(Model):
    """Metric analysis of the canary."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.provider) || self.provider != 'prometheus' || has(self.prometheus)",
                "analysis.provider prometheus needs analysis.prometheus.address",
                ".prometheus",
            ),
        )
    }

    interval: str = Field(
        default="10s", description="How often analysis runs.", pattern=DURATION_PATTERN
    )
    provider: Literal["builtin", "prometheus"] = Field(
        default="builtin",
        description="builtin scrapes the revisions' pods' /metrics; prometheus runs queries.",
    )
    prometheus: PrometheusProvider | None = Field(
        default=None, description="Prometheus settings (provider prometheus)."
    )
    min_samples: int = Field(
        default=20,
        ge=1,
        description="Fewer canary requests in an interval make it Inconclusive (never a pass or a failure).",
    )
    pool_window: str = Field(
        default="1m",
        description=(
            "Consecutive inconclusive intervals at the same step pool their samples while the oldest"
            " pooled sample is at most this old, and at most 20 intervals (both providers, unless"
            " custom Prometheus query templates are set); a"
            " window shorter than interval judges every interval alone."
        ),
        pattern=DURATION_PATTERN,
    )
    failure_limit: int = Field(
        default=1, ge=1, description="Failed intervals that trigger rollback."
    )
    inconclusive_limit: int = Field(
        default=0,
        ge=0,
        description="Inconclusive intervals before the rollout pauses for a human (0: wait for traffic until the progress deadline).",
    )
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Pass/fail limits.")


class GoldenPrompt(Model):
    """One prompt of the pre-traffic eval gate."""

    prompt: str = Field(description="Prompt sent to the canary (completion API).")
    expected: str = Field(description="Expected answer.")


class EvalGate(Model):
    """Golden prompts run against the canary before it gets any traffic.

    The canary stays at weight 0 until one of its pods has answered every prompt (temperature
    0); a score below minScore (or more than maxScoreDrop below stable's) rolls it back. With
    traffic.mode replicas there is no router to hold traffic back: the canary's first pod is
    already behind the shared Service while the gate runs, so use gatewayAPI for a strict gate.
    """

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "size(self.prompts) > 0 || has(self.promptsUri)",
                "evalGate needs golden prompts: set evalGate.prompts or evalGate.promptsUri",
            ),
        )
    }

    prompts: list[GoldenPrompt] = Field(default_factory=list, description="Inline golden prompts.")
    prompts_uri: str | None = Field(
        default=None,
        description=(
            'JSONL file, one {"prompt": ..., "expected": ...} object per line; used when prompts '
            "is empty. Read by the operator (with its own credentials) and the local runtime "
            "whenever the gate runs; a bad line is reported with the file and line number. "
            "s3://bucket/path/file.jsonl (at spec.storage's endpoint) or "
            "file:///absolute/path/file.jsonl (local runtime; in a cluster, a path in the "
            "operator's pod)."
        ),
        pattern=URI_PATTERN,
    )
    match: Literal["exact", "contains"] = Field(
        default="contains",
        description=(
            "How an answer is scored. exact: the answer's first line equals expected, both with "
            "whitespace runs as one space, surrounding punctuation and quotes removed, and case "
            "folded (the rule of a FineTuneJob's evalAccuracy); contains: expected appears "
            "anywhere in the answer, case folded."
        ),
    )
    min_score: float = Field(
        default=0.8, ge=0.0, le=1.0, description="Lowest share of correct answers."
    )
    max_score_drop: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Largest drop against stable's score."
    )
    max_tokens: int = Field(default=32, ge=1, description="max_tokens per golden prompt.")


class RolloutSpec(Model):
    """Canary strategy."""

    steps: list[RolloutStep] = Field(
        default_factory=lambda: [
            RolloutStep(set_weight=10),
            RolloutStep(analysis=AnalysisStep(intervals=2)),
            RolloutStep(set_weight=50),
            RolloutStep(analysis=AnalysisStep(intervals=2)),
        ],
        max_length=32,
        description="Canary steps in order; after the last one the canary is promoted.",
        json_schema_extra=validations(
            cel(
                "self.filter(s, has(s.setWeight)).map(s, s.setWeight).isSorted() && "
                "self.filter(s, has(s.setWeight)).all(s, size(self.filter(t, has(t.setWeight) && t.setWeight == s.setWeight)) == 1)",
                "setWeight values must be strictly increasing",
            ),
        ),
    )
    analysis: AnalysisSpec = Field(
        default_factory=AnalysisSpec, description="Metric analysis during the canary."
    )
    eval_gate: EvalGate | None = Field(
        default=None,
        description=(
            "Optional golden-prompt gate: the canary stays at weight 0 until it passes. With "
            "traffic.mode replicas its first pod already sits behind the shared Service meanwhile; "
            "use gatewayAPI for a strict pre-traffic gate."
        ),
    )
    progress_deadline_seconds: int = Field(
        default=600,
        ge=30,
        description="A canary that makes no progress this long (never ready, stuck) is rolled back.",
    )
    scale_down_delay_seconds: int = Field(
        default=5,
        ge=0,
        le=3600,
        description=(
            "A revision whose traffic weight reached 0 (rolled back, superseded or replaced by a promotion) keeps "
            "its pods this long before they are removed, so routers converge and in-flight requests drain."
        ),
    )


# The serving pods' scrape annotations (kubetune.rollout.builders) and the server env's names are
# kubetune's too: a podTemplate may not set them.
SCRAPE_ANNOTATION_PREFIX = "prometheus.io/"


class ModelDeploymentSpec(Model):
    """Desired state of a ModelDeployment."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "!has(self.serviceAccountName) || !has(self.storage.serviceAccountName) || "
                "self.serviceAccountName == self.storage.serviceAccountName",
                "serviceAccountName and storage.serviceAccountName differ; set serviceAccountName only",
                ".serviceAccountName",
            ),
            *spec_rules("nodeSelector"),
            cel(
                f"!has(self.podTemplate) || self.podTemplate.annotations.all(k, !k.startsWith('{SCRAPE_ANNOTATION_PREFIX}'))",
                f"kubetune sets the serving pods' {SCRAPE_ANNOTATION_PREFIX}* annotations (scrape, port, path)",
                ".podTemplate.annotations",
            ),
            cel(
                "!has(self.podTemplate) || self.podTemplate.env.all(e, !self.server.env.exists(s, s.name == e.name))",
                "podTemplate.env sets a variable server.env also sets; set it in one place",
                ".podTemplate.env",
            ),
            cel(
                # has() guards: nested defaults are not filled in where CEL runs (see TrafficSpec).
                "!has(self.server) || !has(self.server.engine) || self.server.engine != 'vllm' "
                "|| !has(self.resources) || !has(self.resources.gpus) || self.resources.gpus > 0",
                "server.engine vllm needs resources.gpus of at least 1: the vLLM image serves on "
                "CUDA GPUs (use engine builtin to serve on CPU)",
                ".resources.gpus",
            ),
        )
    }
    model: ModelSource = Field(description="What to serve.")
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description=(
            "Serving pods of the stable revision; a canary gets its pods on top, sized from this "
            "count. The scale subresource writes it (kubectl scale, an HPA or a KEDA ScaledObject "
            "targeting the ModelDeployment). 0 scales to zero: no pods, and no canary starts "
            "until it is raised again."
        ),
    )
    resources: ServeResources = Field(
        default_factory=ServeResources, description="Compute per pod."
    )
    server: ServerSpec = Field(default_factory=ServerSpec, description="Inference server settings.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="Object-store endpoint and credentials."
    )
    traffic: TrafficSpec = Field(default_factory=TrafficSpec, description="Traffic splitting.")
    rollout: RolloutSpec = Field(
        default_factory=RolloutSpec, description="Canary steps and analysis."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None,
        max_length=16,
        description=(
            "Secrets in the namespace holding registry credentials for the server image (and "
            "sidecars); replaces the operator's default list (chart value defaults.imagePullSecrets). "
            "Part of the revision."
        ),
    )
    service_account_name: str | None = name_ref_field(
        "ServiceAccount the serving pods run as (its imagePullSecrets and workload identity "
        "apply). Replaces storage.serviceAccountName."
    )
    pod_template: PodTemplate | None = Field(
        default=None,
        description=(
            "Changes to the serving pods: labels, annotations, placement, volumes, env, "
            "sidecars. Added to what kubetune builds; never replaces what it sets "
            "(docs/training.md, Pod overrides). Part of the revision: a change rolls out as a canary."
        ),
    )

    @model_validator(mode="after")
    def _pod_rules(self) -> ModelDeploymentSpec:
        problems = spec_problems(
            self.pod_template,
            dict(self.resources.node_selector),
            self.resources.priority_class_name,
            "nodeSelector",
        )
        sa, legacy = self.service_account_name, self.storage.service_account_name
        if sa and legacy and sa != legacy:
            problems.append(
                f"serviceAccountName {sa!r} and storage.serviceAccountName {legacy!r} differ; set serviceAccountName only"
            )
        if self.pod_template is not None:
            problems += [
                f"podTemplate.annotations[{k!r}]: kubetune sets the serving pods' {SCRAPE_ANNOTATION_PREFIX}* annotations"
                for k in self.pod_template.annotations
                if k.startswith(SCRAPE_ANNOTATION_PREFIX)
            ]
            server_env = {e.name for e in self.server.env}
            problems += [
                f"podTemplate.env[{i}].name: server.env also sets {e.name}; set it in one place"
                for i, e in enumerate(self.pod_template.env)
                if e.name in server_env
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def account(self) -> str | None:
        """The ServiceAccount the serving pods run as (serviceAccountName, else storage's)."""
        return self.service_account_name or self.storage.service_account_name


# --- status -------------------------------------------------------------------------------

MdepPhase = Literal[
    "Pending", "Progressing", "Paused", "Healthy", "Degraded", "RolledBack", "ScaledToZero"
]


class RevisionStatus(Model):
    """A serving revision."""

    name: str = Field(description="Revision hash.")
    model_uri: str | None = Field(default=None, description="Base model served.")
    adapter_uri: str | None = Field(default=None, description="Adapter served.")
    adapter_digest: str | None = Field(default=None, description="Digest of the adapter artifact.")
    fine_tune_job: str | None = Field(
        default=None, description="FineTuneJob the artifact came from."
    )
    model_name: str | None = Field(default=None, description="Model name clients send.")
    image: str | None = Field(
        default=None, description="Image of the serving container (kubetune server or vLLM)."
    )
    engine: str | None = Field(default=None, description="Serving engine: builtin or vllm.")
    adapter_rank: int | None = Field(
        default=None, description="LoRA rank of the adapter, when its FineTuneJob says it."
    )
    ready_replicas: int | None = Field(default=None, description="Ready pods.")
    replicas: int | None = Field(default=None, description="Desired pods.")


class Weights(Model):
    """Traffic weights actually applied."""

    stable: int = Field(default=100, description="Percent to stable.")
    canary: int = Field(default=0, description="Percent to canary.")
    requested_canary: int | None = Field(
        default=None, description="Percent the current step asked for."
    )
    mode: str | None = Field(default=None, description="gatewayAPI, replicas or local.")
    warning: str | None = Field(
        default=None, description="Set when the achieved weight is far from the requested one."
    )


class AnalysisResult(Model):
    """One analysis interval."""

    time: str = Field(description="When it ran.")
    phase: Literal["Successful", "Failed", "Inconclusive", "Error"] = Field(description="Verdict.")
    samples: int | None = Field(default=None, description="Canary requests in the interval.")
    message: str | None = Field(default=None, description="Why.")
    canary: dict[str, float] | None = Field(
        default=None, description="Canary metrics (errorRate, p95LatencySeconds, ttftP95Seconds)."
    )
    stable: dict[str, float] | None = Field(default=None, description="Stable metrics, same keys.")
    revision: str | None = Field(default=None, description="Canary revision the interval judged.")
    step: int | None = Field(default=None, description="Index of the rollout step it ran in.")
    pooled_intervals: int | None = Field(
        default=None,
        description="Consecutive inconclusive intervals whose samples the verdict used (set when more than 1).",
    )
    canary_share: float | None = Field(
        default=None, description="Canary's observed share of all requests over the judged span."
    )
    expected_canary_share: float | None = Field(
        default=None, description="Share of requests the canary's applied weight promises."
    )
    starved: bool | None = Field(
        default=None,
        description="The canary got far fewer requests than its weight promises (statistically certain).",
    )


class CounterSnapshot(Model):
    """Cumulative counters of one revision, summed over its pods (scraped, or read from Prometheus; through the engine's metric map)."""

    requests: float = Field(default=0.0, description="Requests served.")
    errors: float = Field(default=0.0, description="Server errors (5xx responses).")
    latency_bounds: list[float] = Field(
        default_factory=list, description="Finite latency bucket bounds (seconds)."
    )
    latency_counts: list[float] = Field(
        default_factory=list, description="Cumulative count per latency bound."
    )
    latency_total: float = Field(default=0.0, description="Latency observations (the +Inf bucket).")
    ttft_bounds: list[float] = Field(
        default_factory=list, description="Finite time-to-first-token bucket bounds."
    )
    ttft_counts: list[float] = Field(
        default_factory=list, description="Cumulative count per TTFT bound."
    )
    ttft_total: float = Field(default=0.0, description="TTFT observations (the +Inf bucket).")
    tpot_bounds: list[float] = Field(
        default_factory=list,
        description="Finite bucket bounds of the per-request time per output token (seconds).",
    )
    tpot_counts: list[float] = Field(
        default_factory=list, description="Cumulative count per time-per-output-token bound."
    )
    tpot_total: float = Field(
        default=0.0, description="Time-per-output-token observations (the +Inf bucket)."
    )
    pods: int = Field(default=0, description="Pods scraped.")
    generated_tokens: float = Field(default=0.0, description="Completion tokens generated.")
    prompt_tokens: float = Field(default=0.0, description="Prompt tokens processed.")


class PooledInterval(Model):
    """Start of an inconclusive interval whose samples still count (analysis.poolWindow)."""

    time: str = Field(description="When the interval started.")
    revisions: dict[str, CounterSnapshot] = Field(
        default_factory=dict, description="Counters per revision at that time."
    )


class AnalysisBaseline(Model):
    """Start of the current analysis interval: when, and the revisions' cumulative counters then."""

    time: str = Field(description="When the interval started.")
    revisions: dict[str, CounterSnapshot] = Field(
        default_factory=dict, description="Counters per revision at that time."
    )
    step: int | None = Field(default=None, description="Rollout step the interval runs in.")
    pool: list[PooledInterval] = Field(
        default_factory=list,
        description="Starts of the consecutive inconclusive intervals before this one at the same step (oldest first); their samples are judged together.",
    )


class RetiringRevision(Model):
    """A revision taken out of traffic; its pods go once its weight is 0 and the drain delay passed."""

    name: str = Field(description="Revision hash.")
    reason: str = Field(
        default="", description="Why it is retired (RolledBack, Promoted, Superseded)."
    )
    zero_weight_since: str | None = Field(
        default=None, description="When its weight was first observed at 0."
    )


class RejectedRevision(Model):
    """A revision that was rolled back; not retried until the spec changes."""

    name: str = Field(description="Revision hash.")
    reason: str = Field(description="Why it was rolled back.")
    time: str | None = Field(default=None, description="When.")


class ModelDeploymentStatus(Model):
    """Observed state of a ModelDeployment."""

    phase: MdepPhase | None = Field(
        default=None,
        description="Pending, Progressing, Paused, Healthy, Degraded, RolledBack or ScaledToZero (spec.replicas 0).",
    )
    message: str | None = Field(default=None, description="Human-readable summary.")
    observed_generation: int | None = Field(
        default=None, description="Generation the status was computed from."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Progressing, Degraded."
    )
    replicas: int | None = Field(
        default=None,
        description="Pods of the stable revision now (the scale subresource's status.replicas, what an HPA reads as its current replicas).",
    )
    selector: str | None = Field(
        default=None,
        description="Label selector of every serving pod of this ModelDeployment, stable and canary (the scale subresource's selector: an HPA averages pod metrics over these pods).",
    )
    stable: RevisionStatus | None = Field(default=None, description="The stable revision.")
    canary: RevisionStatus | None = Field(
        default=None, description="The canary revision, while a rollout runs."
    )
    current_step_index: int | None = Field(
        default=None, description="Index into rollout.steps of the canary."
    )
    step_started_at: str | None = Field(default=None, description="When the current step started.")
    canary_started_at: str | None = Field(
        default=None, description="When the current canary started."
    )
    weights: Weights | None = Field(default=None, description="Applied traffic weights.")
    analysis: list[AnalysisResult] = Field(
        default_factory=list, description="Latest analysis results (newest last)."
    )
    eval_gate_score: float | None = Field(
        default=None, description="Golden-prompt score of the canary."
    )
    eval_gate_stable_score: float | None = Field(
        default=None, description="Golden-prompt score of stable (with maxScoreDrop)."
    )
    analysis_baseline: AnalysisBaseline | None = Field(
        default=None, description="Start of the current analysis interval."
    )
    retiring: list[RetiringRevision] = Field(
        default_factory=list, description="Revisions whose pods are being removed."
    )
    rejected_revisions: list[RejectedRevision] = Field(
        default_factory=list, description="Rolled-back revisions."
    )
    paused: bool | None = Field(
        default=None,
        description="Paused by a human (kubetune.io/pause) or an indefinite pause step.",
    )


class ModelDeployment(Model):
    """A ModelDeployment manifest.

    NAME_RULES sit at the root of the CRD schema (CEL may read metadata.name only there); the
    local runtime, which parses manifests with this model, checks the same limits.
    """

    model_config = Model.model_config | {"json_schema_extra": validations(*NAME_RULES)}

    api_version: Literal["kubetune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["ModelDeployment"] = Field(default=KIND)
    metadata: ObjectMeta
    spec: ModelDeploymentSpec
    status: ModelDeploymentStatus | None = None

    @model_validator(mode="after")
    def _children_can_be_named(self) -> ModelDeployment:
        """NAME_RULES in Python (a test holds the two to the same verdicts)."""
        name = self.metadata.name
        if len(name) > NAME_MAX_LENGTH:
            raise ValueError(f"metadata.name: {NAME_RULES[0]['message']}")
        if not re.fullmatch(DNS1035_LABEL_PATTERN, name):
            raise ValueError(f"metadata.name: {NAME_RULES[1]['message']}")
        return self
