"""FineTuneJob: validate a dataset, fine-tune a base model, checkpoint, resume, publish.

The spec is what a user writes; the status is written by two parties (DESIGN.md, progress
channel): the operator owns ``phase``, ``conditions``, ``message``, ``restarts`` and the times;
the trainer patches ``progress``, ``metrics``, ``checkpoints`` and ``resumedFromStep``.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from kubetune.api.common import (
    API_VERSION,
    DNS1035_LABEL_PATTERN,
    LABEL_VALUE_PATTERN,
    MAX_LABEL_LENGTH,
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

KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SHORT_NAMES = ["ftj"]

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/trainer:0.1.0"
MAX_NODES = 128

# --- names of the children ----------------------------------------------------------------
#
# Every child's name is derived from metadata.name (kubetune.finetune.builders): the Jobs
# <name>-validate and <name>-train, the ServiceAccount/Role/RoleBinding <name>-trainer and, with
# nodes > 1, the headless Service <name>-train. The tightest limits those put on the name:
# - with nodes > 1 the train Job is an Indexed Job whose pods are named by hostname
#   <name>-train-<index>, index up to nodes - 1 = 127, and the Job API refuses a Job whose
#   largest such hostname is not a DNS-1123 label (at most 63): 63 - len("-train-127") = 53;
# - a Job's name becomes the value of its pods' job-name label (at most 63): 63 - len("-validate")
#   = 54, and kubetune.io/owner=<name> is a label value itself;
# - with nodes > 1 the Service <name>-train needs a DNS-1035 label (starts with a letter, no
#   dots), and the pods' hostname and subdomain a DNS-1123 label (no dots).
# One limit for every spec (53) keeps a later change of nodes from stranding an existing job.
# A test builds every child with the longest allowed name and checks it against these rules.
NAME_MAX_LENGTH = MAX_LABEL_LENGTH - len(f"-train-{MAX_NODES - 1}")
NAME_RULES = (
    cel(
        f"self.metadata.name.size() <= {NAME_MAX_LENGTH}",
        f"must be at most {NAME_MAX_LENGTH} characters: the trainer pods of a multi-node job get "
        f"the hostname '<name>-train-<index>' (index up to {MAX_NODES - 1}) and the Job "
        "'<name>-validate' becomes its pods' job-name label value; both must fit in 63 characters",
        ".metadata.name",
    ),
    cel(
        f"self.spec.nodes == 1 || self.metadata.name.matches('{DNS1035_LABEL_PATTERN}')",
        "with nodes > 1 the name must be a DNS-1035 label (lowercase letters, digits and '-', "
        "starting with a letter; no '.'): it names the headless Service '<name>-train' and the "
        "trainer pods' hostnames",
        ".metadata.name",
    ),
)


class BaseModelRef(Model):
    """The model to fine-tune."""

    uri: str = Field(
        description="Where the base model's weights live (a Hugging Face-format folder). " + URI_DESCRIPTION,
        pattern=URI_PATTERN,
    )
    revision: str | None = Field(
        default=None,
        description="Optional revision label recorded in the lineage (e.g. a commit or version).",
    )


class CustomPiiPattern(Model):
    """A user-defined PII pattern to mask."""

    name: str = Field(description="Name of the kind, used in the data report counts.", pattern=r"^[a-zA-Z][a-zA-Z0-9_-]*$")
    regex: str = Field(description="Python regular expression; every match is replaced by [NAME].", min_length=1)


class PiiMasking(Model):
    """Personally identifiable information masked before training."""

    kinds: list[Literal["email", "phone", "idCard", "creditCard", "ipAddress"]] = Field(
        default_factory=list,
        description="Built-in detectors to apply: email, phone, idCard, creditCard, ipAddress.",
    )
    custom: list[CustomPiiPattern] = Field(
        default_factory=list, description="Extra regular expressions to mask, each with a name."
    )


class DatasetSpec(Model):
    """Training data: JSONL files, validated on CPU before any GPU is requested."""

    train: str = Field(description="JSONL training file. " + URI_DESCRIPTION, pattern=URI_PATTERN)
    validation: str | None = Field(
        default=None,
        description="Optional JSONL validation file; when absent, validationSplit of train is held out.",
        pattern=URI_PATTERN,
    )
    format: Literal["auto", "chat", "completion", "text"] = Field(
        default="auto",
        description=(
            "Record format: chat ({messages:[{role,content}]}), completion ({prompt,completion}), "
            "text ({text}); auto detects it from the first valid record."
        ),
    )
    validation_split: float = Field(
        default=0.1,
        ge=0.0,
        le=0.5,
        description="Fraction of train held out for evaluation (by content hash, stable across re-runs).",
    )
    dedupe: bool = Field(default=True, description="Drop exact and normalised (case/whitespace) duplicates.")
    pii_masking: PiiMasking = Field(default_factory=PiiMasking, description="PII masking before training.")
    max_seq_length: int = Field(default=1024, ge=16, le=131072, description="Token limit per example; longer ones are truncated and counted.")
    packing: bool = Field(default=False, description="Pack several short examples into one sequence of maxSeqLength; each example attends only to itself (block-diagonal attention, docs/training.md).")
    min_examples: int = Field(default=10, ge=1, description="Fail validation when fewer usable training examples remain.")
    max_invalid_fraction: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Fail validation when more than this fraction of lines is invalid."
    )


class LoraSpec(Model):
    """LoRA adapter settings (method lora or qlora)."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the low-rank update matrices.")
    alpha: int = Field(default=32, ge=1, le=4096, description="Scaling numerator: updates are scaled by alpha/r.")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description="Module names to adapt (e.g. q_proj, v_proj), or all-linear for every linear layer but the output head.",
    )


class MethodSpec(Model):
    """Fine-tuning method."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel("self.type != 'full' || !has(self.lora)", "method.lora applies only to type lora or qlora", ".lora"),
        )
    }
    type: Literal["lora", "qlora", "full"] = Field(
        default="lora",
        description="lora: low-rank adapter; qlora: LoRA over a 4-bit quantised base (needs a GPU); full: all weights.",
    )
    lora: LoraSpec | None = Field(default=None, description="LoRA settings; defaults apply when omitted with lora/qlora.")


class HyperParameters(Model):
    """Optimisation settings."""

    epochs: float = Field(default=1.0, gt=0, le=1000, description="Passes over the training data (ignored when maxSteps is set).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps; overrides epochs.")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=0.5, description="Fraction of steps with linear warmup.")
    batch_size: int = Field(default=8, ge=1, le=4096, description="Micro-batch size per device.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024, description="Micro-batches per optimiser step.")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping norm (0 disables).")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="auto picks bf16 where the GPU supports it, else fp16 on GPU, fp32 on CPU."
    )
    seed: int = Field(default=42, ge=0, description="Seed for initialisation, data order and dropout.")
    gradient_checkpointing: bool | None = Field(
        default=None,
        description=(
            "Recompute each decoder layer's activations in the backward pass instead of keeping "
            "them (less memory, about a third more compute). Unset (auto): on when the memory "
            "estimate of the validation step says the job needs it to fit resources.gpuMemory."
        ),
    )


class EarlyStopping(Model):
    """Stop when eval loss stops improving."""

    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, description="Smallest eval-loss decrease that counts as improvement.")


class EvaluationSpec(Model):
    """Evaluation on the validation set."""

    every_steps: int = Field(default=50, ge=1, description="Evaluate every N optimiser steps (and at the end).")
    early_stopping: EarlyStopping | None = Field(default=None, description="Optional early stopping.")


class CheckpointSpec(Model):
    """Platform-owned checkpoints (DESIGN.md, checkpoint contract)."""

    every_steps: int = Field(default=100, ge=1, description="Checkpoint every N optimiser steps (and on SIGTERM).")
    keep_last: int = Field(default=2, ge=1, le=100, description="Complete checkpoints kept (older ones are deleted).")
    keep_best: bool = Field(default=True, description="Also keep the checkpoint with the lowest eval loss.")


class OutputSpec(Model):
    """Where checkpoints and the published artifact go."""

    uri: str = Field(
        description="Output prefix: checkpoints under <uri>/checkpoints/, the artifact under <uri>/model/. " + URI_DESCRIPTION,
        pattern=URI_PATTERN,
    )
    merge_adapter: bool = Field(default=False, description="Also publish the adapter merged into the base weights.")


class TrainResources(Model):
    """Compute for the trainer pods."""

    gpus: int = Field(default=1, ge=0, le=64, description="nvidia.com/gpu per node (0 trains on CPU, for tests and tiny models).")
    gpu_node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        description="Node labels the GPU pods must match, e.g. {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}.",
    )
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations for tainted GPU nodes.")
    cpu: str = Field(default="4", description="CPU request per pod (Kubernetes quantity).", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    memory: str = Field(
        default="32Gi", description="Memory request and limit per pod (Kubernetes quantity).", pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[eE][0-9]+)?$"
    )
    priority_class_name: str | None = name_ref_field("PriorityClass of the trainer pods.")
    gpu_memory: str | None = Field(
        default=None,
        description=(
            "Memory of one GPU (Kubernetes quantity, e.g. 80Gi) for the memory pre-flight: the "
            "validation step fails the job when the estimated peak per GPU exceeds it. Unset: "
            "taken from gpuNodeSelector's nvidia.com/gpu.product when that names a known GPU "
            "(docs/training.md lists them), else the pre-flight only reports the estimate."
        ),
        pattern=r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[eE][0-9]+)?$",
    )


Strategy = Literal["auto", "ddp", "fsdp"]


class DistributedSpec(Model):
    """How the trainer processes (nodes x GPUs) share the model."""

    strategy: Strategy = Field(
        default="auto",
        description=(
            "ddp: every process holds the whole model and averages gradients (DistributedDataParallel). "
            "fsdp: parameters, gradients and optimizer state are sharded across the processes "
            "(PyTorch FSDP2, one unit per decoder layer; bf16 parameters with fp32 gradient reduction "
            "on GPU) and checkpoints are written by every process (torch.distributed.checkpoint). "
            "auto: fsdp for method.type full, ddp for lora and qlora. The choice depends on the spec "
            "only, never on the process count, so a job resumes after nodes or gpus change."
        ),
    )


def resolve_strategy(spec: FineTuneJobSpec) -> Literal["ddp", "fsdp"]:
    """``distributed.strategy`` with auto resolved (fsdp for full fine-tuning, ddp otherwise)."""
    if spec.distributed.strategy != "auto":
        return spec.distributed.strategy
    return "fsdp" if spec.method.type == "full" else "ddp"


class RetrySpec(Model):
    """What happens when a trainer pod or node is lost."""

    max_restarts: int = Field(default=3, ge=0, le=100, description="Training restarts (each resumes from the last checkpoint) before the job fails.")
    backoff_seconds: int = Field(default=30, ge=0, le=3600, description="Wait before a restart.")


class FineTuneJobSpec(Model):
    """Desired state of a FineTuneJob."""

    model_config = Model.model_config | {
        "json_schema_extra": validations(
            cel(
                "self.method.type != 'qlora' || self.resources.gpus > 0",
                "method.type qlora needs resources.gpus >= 1 (4-bit quantisation runs on GPUs only)",
                ".resources.gpus",
            ),
            cel(
                "self.method.type != 'qlora' || self.distributed.strategy != 'fsdp'",
                "distributed.strategy fsdp applies to method.type full and lora; qlora's 4-bit base "
                "trains with ddp (set distributed.strategy to auto or ddp)",
                ".distributed.strategy",
            ),
            cel(
                "!self.output.mergeAdapter || self.distributed.strategy != 'fsdp'",
                "output.mergeAdapter needs the whole base model in one process and distributed.strategy "
                "fsdp shards it: set distributed.strategy ddp, or merge the published adapter afterwards",
                ".output.mergeAdapter",
            ),
            cel(
                "self.nodes == 1 || self.resources.gpus > 0",
                "nodes > 1 needs resources.gpus >= 1",
                ".nodes",
            ),
            cel(
                "!self.output.mergeAdapter || self.method.type != 'full'",
                "output.mergeAdapter applies only to method.type lora or qlora (full fine-tuning has no adapter to merge)",
                ".output.mergeAdapter",
            ),
            cel(
                "!has(self.evaluation.earlyStopping) || has(self.dataset.validation) || self.dataset.validationSplit > 0.0",
                "evaluation.earlyStopping needs evaluation data: set dataset.validation or a dataset.validationSplit above 0",
                ".evaluation.earlyStopping",
            ),
            cel(
                "!has(self.serviceAccountName) || !has(self.storage.serviceAccountName) || "
                "self.serviceAccountName == self.storage.serviceAccountName",
                "serviceAccountName and storage.serviceAccountName differ; set serviceAccountName only",
                ".serviceAccountName",
            ),
            *spec_rules("gpuNodeSelector"),
        )
    }
    base_model: BaseModelRef = Field(
        description="The model to fine-tune. Immutable.",
        json_schema_extra=validations(cel("self == oldSelf", "baseModel is immutable; create a new FineTuneJob")),
    )
    dataset: DatasetSpec = Field(
        description="Training data. Immutable.",
        json_schema_extra=validations(cel("self == oldSelf", "dataset is immutable; create a new FineTuneJob")),
    )
    method: MethodSpec = Field(default_factory=MethodSpec, description="LoRA, QLoRA or full fine-tuning.")
    hyperparameters: HyperParameters = Field(default_factory=HyperParameters, description="Optimisation settings.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation and early stopping.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoint frequency and retention.")
    output: OutputSpec = Field(description="Where checkpoints and the artifact are written.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-store endpoint and credentials.")
    resources: TrainResources = Field(default_factory=TrainResources, description="GPUs, CPU, memory and placement.")
    nodes: int = Field(default=1, ge=1, le=MAX_NODES, description="Trainer pods (nodes); > 1 runs an Indexed Job with torchrun rendezvous.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="How the trainer processes share the model: ddp or fsdp."
    )
    image: str | None = Field(
        default=None,
        description=(
            "Trainer container image. Default: the operator's (chart value defaults.trainerImage, "
            "else " + DEFAULT_TRAINER_IMAGE + ")."
        ),
        min_length=1,
    )
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Automatic restart policy.")
    suspend: bool = Field(default=False, description="Stop the pods, keep the checkpoints; set back to false to resume.")
    queue_name: str | None = Field(
        default=None,
        description=(
            "Kueue LocalQueue; the Jobs get label kueue.x-k8s.io/queue-name, so it must be a valid "
            "label value (at most 63 characters)."
        ),
        pattern=LABEL_VALUE_PATTERN,
        max_length=MAX_LABEL_LENGTH,
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the FineTuneJob this long after it finished (its artifact stays)."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None,
        max_length=16,
        description=(
            "Secrets in the namespace holding registry credentials for the trainer image (and "
            "sidecars); replaces the operator's default list (chart value defaults.imagePullSecrets)."
        ),
    )
    service_account_name: str | None = name_ref_field(
        "ServiceAccount whose imagePullSecrets and workload-identity annotations (IRSA, GKE WI) "
        "the per-job ServiceAccount <name>-trainer copies; the pods run as <name>-trainer, whose "
        "Role lets the trainer report progress. Replaces storage.serviceAccountName."
    )
    pod_template: PodTemplate | None = Field(
        default=None,
        description=(
            "Changes to the validate and train pods: labels, annotations, placement, volumes, "
            "env, sidecars. Added to what kubetune builds; never replaces what it sets "
            "(docs/training.md, Pod overrides)."
        ),
    )

    @model_validator(mode="after")
    def _pod_rules(self) -> FineTuneJobSpec:
        problems = spec_problems(
            self.pod_template,
            dict(self.resources.gpu_node_selector),
            self.resources.priority_class_name,
            "gpuNodeSelector",
        )
        sa, legacy = self.service_account_name, self.storage.service_account_name
        if sa and legacy and sa != legacy:
            problems.append(
                f"serviceAccountName {sa!r} and storage.serviceAccountName {legacy!r} differ; set serviceAccountName only"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def account(self) -> str | None:
        """The ServiceAccount the pods' identity comes from (serviceAccountName, else storage's)."""
        return self.service_account_name or self.storage.service_account_name


# --- status -------------------------------------------------------------------------------

Phase = Literal["Pending", "Validating", "Running", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = ("Pending", "Validating", "Running", "Succeeded", "Failed", "Suspended")


class Progress(Model):
    """Training progress, reported by the trainer."""

    step: int = Field(default=0, description="Optimiser steps done.")
    total_steps: int | None = Field(default=None, description="Optimiser steps planned.")
    epoch: float | None = Field(default=None, description="Fractional epoch.")
    percent: int | None = Field(default=None, description="step / totalSteps in percent.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds left.")
    tokens_per_second: float | None = Field(default=None, description="Training throughput (all pods).")
    updated_at: str | None = Field(default=None, description="When the trainer last reported.")


class Metrics(Model):
    """Loss figures, reported by the trainer."""

    train_loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest eval loss.")
    best_eval_loss: float | None = Field(default=None, description="Lowest eval loss so far.")
    eval_perplexity: float | None = Field(default=None, description="exp(evalLoss).")
    eval_accuracy: float | None = Field(default=None, description="Exact-match accuracy when the task defines one.")


class CheckpointRecord(Model):
    """One complete checkpoint (its manifest verified)."""

    step: int = Field(description="Optimiser step of the checkpoint.")
    uri: str = Field(description="Where it is stored.")
    eval_loss: float | None = Field(default=None, description="Eval loss at that step.")
    time: str | None = Field(default=None, description="When it was completed.")


class DataReportSummary(Model):
    """Summary of the validator's data report (the full JSON is at reportUri)."""

    format: str | None = Field(default=None, description="Detected or declared record format.")
    total_lines: int | None = Field(default=None, description="Lines read.")
    valid: int | None = Field(default=None, description="Valid records.")
    invalid: int | None = Field(default=None, description="Invalid lines (see the report for file:line and reason).")
    blank_lines: int | None = Field(default=None, description="Blank lines skipped (a warning; neither valid nor invalid).")
    duplicates: int | None = Field(default=None, description="Duplicates removed.")
    pii_masked: dict[str, int] | None = Field(default=None, description="Masked spans by kind.")
    train_examples: int | None = Field(default=None, description="Examples used for training.")
    validation_examples: int | None = Field(default=None, description="Examples used for evaluation.")
    truncated: int | None = Field(default=None, description="Examples longer than maxSeqLength (truncated).")
    digest: str | None = Field(default=None, description="sha256 of the validated dataset.")
    report_uri: str | None = Field(default=None, description="Full data report (JSON).")


class MemoryEstimate(Model):
    """Peak memory per GPU estimated by the validation step from the base model's config.json."""

    per_gpu_gib: float = Field(description="Estimated peak per GPU (GiB): the sum of the parts below plus overhead.")
    gpu_memory_gib: float | None = Field(default=None, description="Memory of one GPU (GiB), from resources.gpuMemory or the GPU product; null when unknown.")
    fits: bool | None = Field(default=None, description="Whether the estimate fits gpuMemoryGib; null when it is unknown.")
    parameters: int | None = Field(default=None, description="Parameters of the base model (from its config).")
    world_size: int | None = Field(default=None, description="Training processes (nodes x GPUs per node).")
    sharded: bool | None = Field(default=None, description="Whether weights, gradients and optimizer state are sharded over worldSize (FSDP).")
    gradient_checkpointing: bool | None = Field(default=None, description="Whether the estimate assumes gradient checkpointing (auto resolves to what fits).")
    parts_gib: dict[str, float] | None = Field(
        default=None, description="The estimate by part (GiB): weights, gradients, optimizer, activations, logits, overhead."
    )
    message: str | None = Field(default=None, description="The verdict in words, with what to change when it does not fit.")


class Artifact(Model):
    """The published model."""

    uri: str = Field(description="<output>/model/: adapter (or merged weights) and tokenizer.")
    digest: str | None = Field(default=None, description="sha256 over the artifact's manifest.")
    lineage_uri: str | None = Field(default=None, description="lineage.json beside the artifact.")
    merged_uri: str | None = Field(default=None, description="Merged weights, when output.mergeAdapter.")


class FineTuneJobStatus(Model):
    """Observed state of a FineTuneJob."""

    phase: Phase | None = Field(default=None, description="Pending, Validating, Running, Succeeded, Failed or Suspended.")
    message: str | None = Field(default=None, description="Human-readable summary of the phase.")
    observed_generation: int | None = Field(default=None, description="Generation the status was computed from.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="DataValidated, Training, Succeeded, Failed, Suspended (Kubernetes condition semantics).",
    )
    progress: Progress | None = Field(default=None, description="Training progress (from the trainer).")
    metrics: Metrics | None = Field(default=None, description="Loss figures (from the trainer).")
    checkpoints: list[CheckpointRecord] = Field(default_factory=list, description="The last few complete checkpoints.")
    resumed_from_step: int | None = Field(default=None, description="Step the current attempt resumed from.")
    restarts: int = Field(default=0, description="Training restarts so far (survive Job deletion and TTL).")
    last_failure_reason: str | None = Field(default=None, description="Reason of the last failed attempt.")
    last_failure_time: str | None = Field(default=None, description="When the last attempt failed.")
    data_report: DataReportSummary | None = Field(default=None, description="Summary of the data validation.")
    memory_estimate: MemoryEstimate | None = Field(
        default=None, description="Peak GPU memory estimated by the validation step (docs/training.md)."
    )
    artifact: Artifact | None = Field(default=None, description="The published model, once Succeeded.")
    start_time: str | None = Field(default=None, description="When the job started.")
    completion_time: str | None = Field(default=None, description="When the job finished.")


class FineTuneJob(Model):
    """A FineTuneJob manifest.

    NAME_RULES sit at the root of the CRD schema (CEL may read metadata.name only there); the
    local runtime, which parses manifests with this model, checks the same limits.
    """

    model_config = Model.model_config | {"json_schema_extra": validations(*NAME_RULES)}

    api_version: Literal["kubetune.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["FineTuneJob"] = Field(default=KIND)
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None

    @model_validator(mode="after")
    def _children_can_be_named(self) -> FineTuneJob:
        """NAME_RULES in Python (a test holds the two to the same verdicts)."""
        name = self.metadata.name
        if len(name) > NAME_MAX_LENGTH:
            raise ValueError(f"metadata.name: {NAME_RULES[0]['message']}")
        if self.spec.nodes != 1 and not re.fullmatch(DNS1035_LABEL_PATTERN, name):
            raise ValueError(f"metadata.name: {NAME_RULES[1]['message']}")
        return self
