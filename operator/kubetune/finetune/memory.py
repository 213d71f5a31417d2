"""Peak GPU memory of a FineTuneJob, estimated from the base model's config.json (pure).

The validation Job (CPU, before any GPU is requested) and ``kubetune validate`` call
:func:`preflight` with the parsed ``config.json`` and the spec; nothing here reads a file.

The estimate is a sum of parts, per GPU, for what the trainer actually does
(kubetune_trainer.train): AdamW, autocast to bf16 on GPU (fp32 on CPU), full fine-tuning keeps
fp32 master weights, LoRA keeps the frozen base in bf16 and the adapters in fp32 (peft's default),
QLoRA keeps the quantised linears in 4-bit NF4 with double quantisation and everything else in
fp32 (``prepare_model_for_kbit_training``). With more than one process, full fine-tuning is
sharded (FSDP: weights, gradients and AdamW state divided by the world size, plus the layers
being gathered); LoRA is replicated (DDP: plus one gradient bucket copy of the adapters).

Activations are counted as the tensors autograd keeps for the backward pass, per token and per
decoder layer of a Llama-style block (RMSNorm, attention through SDPA/flash, gated MLP); the
counts are written out in :func:`layer_activation_bytes` and checked against autograd's own saved
tensors in tests/unit/test_finetune_memory.py. Gradient checkpointing keeps each layer's input
only and recomputes one layer at a time in the backward pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

GIB = 1024**3

# CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation: what a real run shows above the
# tensors it allocates. A fixed part plus a share of the tensors.
OVERHEAD_FIXED = 1.0 * GIB
OVERHEAD_SHARE = 0.05

# QLoRA: NF4 (4 bits) plus double-quantised absmax constants, 8 bits per block of 64 and 32 bits
# per 256 blocks (Dettmers et al. 2023, "QLoRA", section 3: 0.127 bits per parameter).
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8

# Architectures whose decoder blocks this module counts (all Llama-style: RMSNorm, rotary
# attention with grouped-query heads, gated MLP); others get no estimate rather than a wrong one.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# nvidia.com/gpu.product label (GPU feature discovery) -> memory of one GPU in GiB, as the driver
# reports it (nvidia-smi's total, rounded down). First match wins, so specific entries come first.
GPU_PRODUCTS: tuple[tuple[str, float, str], ...] = (
    (r"GH200", 95.0, "GH200 96GB"),
    (r"H200", 140.0, "H200 141GB"),
    (r"H100.*NVL", 93.0, "H100 NVL 94GB"),
    (r"H100", 79.0, "H100 80GB"),
    (r"H800", 79.0, "H800 80GB"),
    (r"B200", 178.0, "B200 180GB"),
    (r"A100.*40GB", 39.0, "A100 40GB"),
    (r"A100", 79.0, "A100 80GB"),
    (r"A800", 79.0, "A800 80GB"),
    (r"L40S?(-|$)", 44.0, "L40/L40S 48GB"),
    (r"(RTX-)?A6000", 47.0, "RTX A6000 48GB"),
    (r"A10G", 22.0, "A10G 24GB"),
    (r"A10(-|$)", 22.0, "A10 24GB"),
    (r"L4(-|$)", 22.0, "L4 24GB"),
    (r"V100.*32GB", 31.0, "V100 32GB"),
    (r"V100", 15.0, "V100 16GB"),
    (r"T4(-|$)", 14.0, "T4 16GB"),
)
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([EPTGMK]i?|[eE][0-9]+)?$")
_SUFFIX = {
    "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "Pi": 1024**5, "Ei": 1024**6,
    "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}  # fmt: skip


class UnsupportedModel(ValueError):
    """The config does not describe an architecture this module can count."""


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a config.json (Llama-style decoder)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False

    @property
    def q_dim(self) -> int:
        """Width of the query projection."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the key (and the value) projection."""
        return self.num_kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """The linear layers of one decoder layer: name -> (in_features, out_features)."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer."""
        n = sum(a * b for a, b in self.linears().values())
        if self.qkv_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.o_bias:
            n += self.hidden_size
        if self.mlp_bias:
            n += 2 * self.intermediate_size + self.hidden_size
        if self.qk_norm:
            n += 2 * self.head_dim
        return n + 2 * self.hidden_size  # input and post-attention RMSNorm

    def root_parameters(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, output head."""
        emb = self.vocab_size * self.hidden_size
        return emb * (1 if self.tie_embeddings else 2) + self.hidden_size

    def parameters(self) -> int:
        """All parameters."""
        return self.num_layers * self.layer_parameters() + self.root_parameters()


def shape_from_config(config: dict[str, Any]) -> ModelShape:
    """A :class:`ModelShape` from a parsed config.json; UnsupportedModel names what is missing."""
    model_type = str(config.get("model_type", ""))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(
            f"model_type {model_type or '(none)'!r} is not one the memory estimate counts "
            f"({', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if not isinstance(config.get(k), int)
    ]
    if missing:
        raise UnsupportedModel(f"config.json has no integer {', '.join(missing)}")
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    attention_bias = bool(config.get("attention_bias", False))
    return ModelShape(
        model_type=model_type,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        # transformers defaults tie_word_embeddings to True when the config omits it
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        # Qwen2 always has q/k/v biases; Llama's attention_bias adds them to o_proj as well.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(config.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
    )


# --- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunPlan:
    """What the spec says about one training process."""

    method: str  # lora | qlora | full
    batch_size: int
    seq_len: int
    world_size: int
    gpus: int  # per node; 0 = CPU
    checkpointing: bool
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    precision: str = "auto"
    strategy: str = "auto"  # distributed.strategy: auto (fsdp for full, ddp otherwise), ddp, fsdp

    @property
    def sharded(self) -> bool:
        """Whether more than one process shards the model (FSDP) instead of replicating it (DDP)."""
        fsdp = self.strategy == "fsdp" or (self.strategy == "auto" and self.method == "full")
        return fsdp and self.world_size > 1

    @property
    def compute_bytes(self) -> int:
        """Bytes per element of activations: bf16/fp16 on GPU, fp32 on CPU or with fp32."""
        if self.precision == "fp32" or (self.precision == "auto" and self.gpus == 0):
            return 4
        return 2


def plan_from_spec(spec: Any, checkpointing: bool | None = None) -> RunPlan:
    """The :class:`RunPlan` of a FineTuneJobSpec (checkpointing overrides the spec's setting)."""
    hp, lora = spec.hyperparameters, spec.method.lora
    gpus = spec.resources.gpus
    return RunPlan(
        method=spec.method.type,
        batch_size=hp.batch_size,
        seq_len=spec.dataset.max_seq_length,
        world_size=spec.nodes * max(gpus, 1),
        gpus=gpus,
        checkpointing=bool(hp.gradient_checkpointing if checkpointing is None else checkpointing),
        lora_r=lora.r if lora else 16,
        lora_targets=tuple(lora.target_modules) if lora else ("all-linear",),
        lora_dropout=lora.dropout if lora else 0.05,
        precision=hp.precision,
        strategy=spec.distributed.strategy,
    )


def adapted_linears(shape: ModelShape, plan: RunPlan) -> dict[str, tuple[int, int]]:
    """The linears of one layer that get a LoRA adapter (none for full fine-tuning)."""
    if plan.method == "full":
        return {}
    linears = shape.linears()
    if "all-linear" in plan.lora_targets:
        return linears
    return {n: dims for n, dims in linears.items() if n in plan.lora_targets}


def layer_activation_bytes(shape: ModelShape, plan: RunPlan) -> float:
    """Bytes autograd keeps per token for the backward pass of one decoder layer.

    ``a`` is the compute dtype's width, ``r`` the residual stream's (:func:`residual_bytes`).
    """
    a = plan.compute_bytes
    r = residual_bytes(plan)
    h, i = shape.hidden_size, shape.intermediate_size
    # Each RMSNorm upcasts to fp32 and keeps its fp32 input and normalised output (4h + 4h), and
    # its output cast to the compute dtype, which the following linears keep (a*h). With a bf16
    # residual the upcast is a third copy; with an fp32 residual and a frozen norm weight (LoRA on
    # CPU) the normalised output need not be kept.
    if r == 4:
        norm = (8 if plan.method != "lora" else 4) * h + a * h
    else:
        norm = (4 + 2 * r) * h + a * h
    # Attention: q, k, v after rotary embedding (kept by SDPA with its output and logsumexp),
    # the output in (batch, seq, heads) layout kept by o_proj.
    attention = norm + a * (shape.q_dim + 2 * shape.kv_dim) + 2 * a * shape.q_dim
    # Gated MLP: gate and up outputs, silu(gate), and silu(gate) * up (down_proj's input).
    mlp = norm + 4 * a * i
    total = attention + mlp
    adapted = adapted_linears(shape, plan)
    if adapted:
        # Each adapter keeps lora_A's output (r values) and, when dropout > 0, its own copy of the
        # input: peft upcasts it to the adapter's fp32, drops out, keeps the result and the mask
        # (4 bytes per input element as measured through autograd's saved tensors).
        per_input = 4 if plan.lora_dropout > 0 else 0
        total += sum(per_input * fan_in + a * plan.lora_r for fan_in, _ in adapted.values())
    return float(total)


def residual_bytes(plan: RunPlan) -> int:
    """Width of the residual stream: fp32 when the embeddings are fp32 (full fine-tuning under
    autocast, QLoRA after ``prepare_model_for_kbit_training``), else the compute dtype (LoRA's
    base is loaded in it; FSDP gathers parameters in it)."""
    if plan.method == "qlora" or (plan.method == "full" and not plan.sharded):
        return 4
    return plan.compute_bytes


def logits_bytes(shape: ModelShape, plan: RunPlan) -> float:
    """Peak bytes per token of the output head and the loss.

    The logits in the compute dtype, their fp32 upcast and log-softmax (kept for the backward),
    then the gradient of the logits (fp32) while both are alive.
    """
    return float((plan.compute_bytes + 12) * shape.vocab_size)


@dataclass
class Estimate:
    """Peak memory per GPU by part, in bytes, and the verdict."""

    parts: dict[str, float]
    plan: RunPlan
    parameters: int
    gpu_memory: float | None = None
    gpu_source: str | None = None
    message: str = ""
    suggestions: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The estimated peak (sum of the parts)."""
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        """Whether it fits one GPU (None when the GPU's memory is unknown or there is none)."""
        if self.gpu_memory is None:
            return None
        return self.total <= self.gpu_memory

    def status(self) -> dict[str, Any]:
        """``status.memoryEstimate`` wire form."""
        out: dict[str, Any] = {
            "perGpuGib": round(self.total / GIB, 1),
            "parameters": self.parameters,
            "worldSize": self.plan.world_size,
            "sharded": self.plan.sharded,
            "gradientCheckpointing": self.plan.checkpointing,
            "partsGib": {k: round(v / GIB, 2) for k, v in self.parts.items()},
            "message": self.message,
        }
        if self.gpu_memory is not None:
            out["gpuMemoryGib"] = round(self.gpu_memory / GIB, 1)
            out["fits"] = self.fits
        return out


def estimate(shape: ModelShape, plan: RunPlan) -> Estimate:
    """Peak memory of one training process (see the module docstring for what is counted)."""
    p_all = shape.parameters()
    p_layer = shape.layer_parameters()
    adapted = adapted_linears(shape, plan)
    trainable = (
        p_all
        if plan.method == "full"
        else shape.num_layers * sum(plan.lora_r * (fi + fo) for fi, fo in adapted.values())
    )
    a = plan.compute_bytes
    w = plan.world_size if plan.sharded else 1
    parts: dict[str, float] = {}
    if plan.method == "full":
        # fp32 master weights, fp32 gradients, AdamW's two fp32 moments: 16 bytes per parameter,
        # divided over the ranks when sharded (ZeRO-3 / FSDP).
        parts["weights"] = 4 * p_all / w
        parts["gradients"] = 4 * p_all / w
        parts["optimizer"] = 8 * p_all / w
        if not plan.sharded and a < 4:
            # autocast caches a compute-dtype copy of every weight until the step's backward ends.
            parts["weights"] += a * p_all
    else:
        if plan.method == "qlora":
            p_linear = shape.num_layers * sum(fi * fo for fi, fo in shape.linears().values())
            parts["weights"] = NF4_BYTES_PER_PARAM * p_linear + 4 * (p_all - p_linear)
        else:
            parts["weights"] = a * p_all / w
        # adapters in fp32: weights, gradients, AdamW moments (sharded with the rest under FSDP)
        parts["weights"] += 4 * trainable / w
        ddp_bucket = 2 if plan.world_size > 1 and not plan.sharded else 1
        parts["gradients"] = 4 * trainable * ddp_bucket / w
        parts["optimizer"] = 8 * trainable / w
    if plan.sharded:
        # FSDP gathers the current and the prefetched layer (compute dtype) and holds one layer's
        # unsharded gradients before the reduce-scatter; the root (embeddings, head) stays
        # gathered through the step.
        parts["gathered"] = a * (3 * p_layer + shape.root_parameters())
    tokens = plan.batch_size * plan.seq_len
    per_layer = layer_activation_bytes(shape, plan)
    r = residual_bytes(plan)
    if plan.checkpointing:
        # each layer's input is kept; one layer at a time is recomputed with all its activations
        parts["activations"] = tokens * (shape.num_layers * r * shape.hidden_size + per_layer)
    else:
        parts["activations"] = tokens * shape.num_layers * per_layer
    parts["logits"] = tokens * logits_bytes(shape, plan)
    tensors = sum(parts.values())
    parts["overhead"] = (OVERHEAD_FIXED if plan.gpus > 0 else 0.0) + OVERHEAD_SHARE * tensors
    return Estimate(parts=parts, plan=plan, parameters=p_all)


# --- GPU memory -------------------------------------------------------------------------------


def parse_quantity(quantity: str) -> float:
    """Bytes of a Kubernetes quantity (80Gi, 80G, 8e10); ValueError names the value."""
    m = _QUANTITY.match(quantity.strip())
    if not m:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity (e.g. 80Gi)")
    number, suffix = float(m.group(1)), m.group(2) or ""
    if suffix[:1] in ("e", "E") and suffix[1:].isdigit():
        return number * 10 ** int(suffix[1:])
    return number * _SUFFIX.get(suffix, 1)


def gpu_product_memory(product: str) -> tuple[float, str] | None:
    """(GiB, name) of a known nvidia.com/gpu.product label value, else None."""
    label = product.upper().removeprefix("NVIDIA-").removeprefix("TESLA-")
    for pattern, gib, name in GPU_PRODUCTS:
        if re.match(pattern, label):
            return gib, name
    return None


def gpu_memory(resources: Any) -> tuple[float | None, str | None]:
    """(bytes, where it came from) of one GPU: resources.gpuMemory, else the product label."""
    if resources.gpus == 0:
        return None, None
    if resources.gpu_memory:
        return parse_quantity(resources.gpu_memory), "resources.gpuMemory"
    product = resources.gpu_node_selector.get(GPU_PRODUCT_LABEL)
    if product:
        known = gpu_product_memory(product)
        if known:
            return known[0] * GIB, f"{GPU_PRODUCT_LABEL} {product} ({known[1]})"
    return None, None


# --- the verdict ------------------------------------------------------------------------------


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def min_sharded_world(shape: ModelShape, plan: RunPlan, budget: float, gpus: int) -> int | None:
    """Fewest nodes (of ``gpus`` GPUs each, up to 128) whose sharded full run fits ``budget``."""
    for nodes in range(1, 129):
        world = nodes * max(gpus, 1)
        if world > 1 and estimate(shape, replace(plan, world_size=world)).total <= budget:
            return nodes
    return None


def suggestions(
    shape: ModelShape, plan: RunPlan, budget: float, auto_checkpointing: bool
) -> list[str]:
    """Changes to the spec that each make the estimate fit ``budget`` (empty: none found)."""
    out: list[str] = []

    def fits(p: RunPlan) -> bool:
        return estimate(shape, p).total <= budget

    if not plan.checkpointing and fits(replace(plan, checkpointing=True)):
        out.append("hyperparameters.gradientCheckpointing: true")
    ckpt = plan.checkpointing or auto_checkpointing
    if plan.method == "full":
        # the fewest nodes, without checkpointing first (the faster run), then with it
        for cp in dict.fromkeys((plan.checkpointing, True)):
            nodes = min_sharded_world(shape, replace(plan, checkpointing=cp), budget, plan.gpus)
            if nodes is not None:
                gpus = max(plan.gpus, 1)
                out.append(
                    f"{nodes * gpus} GPUs with FSDP (nodes: {nodes} x resources.gpus: {gpus}; "
                    "weights, gradients and optimizer state are sharded over them"
                    + (")" if cp == plan.checkpointing else ", and gradient checkpointing)")
                )
                break
        if fits(replace(plan, method="lora", world_size=plan.world_size, checkpointing=ckpt)):
            out.append("method.type: lora")
    if plan.method in ("full", "lora") and plan.gpus > 0 and not any("lora" in s for s in out):
        if fits(replace(plan, method="qlora", checkpointing=ckpt)):
            out.append("method.type: qlora")
    for bs in (plan.batch_size // 2, plan.batch_size // 4, 1):
        if 1 <= bs < plan.batch_size and fits(replace(plan, batch_size=bs, checkpointing=ckpt)):
            factor = plan.batch_size // bs
            out.append(
                f"hyperparameters.batchSize: {bs} (and gradientAccumulationSteps x{factor} to keep the batch)"
            )
            break
    return out


def preflight(config: dict[str, Any], spec: Any) -> Estimate:
    """The estimate for ``spec`` on the model of ``config``, with its verdict and message.

    ``hyperparameters.gradientCheckpointing`` unset (auto) turns checkpointing on when the run
    does not fit the GPU without it (the estimate then says so); set, it is taken as given.
    Raises UnsupportedModel when the config cannot be counted.
    """
    shape = shape_from_config(config)
    budget, source = gpu_memory(spec.resources)
    requested = spec.hyperparameters.gradient_checkpointing
    plan = plan_from_spec(spec, checkpointing=bool(requested))
    est = estimate(shape, plan)
    auto_on = False
    if requested is None and budget is not None and est.total > budget:
        with_ckpt = estimate(shape, replace(plan, checkpointing=True))
        if with_ckpt.total < est.total:
            est, auto_on = with_ckpt, True
    est.gpu_memory, est.gpu_source = budget, source
    shards = f", sharded over {plan.world_size} GPUs" if est.plan.sharded else ""
    ckpt = (
        ", gradient checkpointing (auto)"
        if auto_on
        else (", gradient checkpointing" if est.plan.checkpointing else "")
    )
    what = (
        f"{est.plan.method}, {_count(est.parameters)} parameters, batch {plan.batch_size} x "
        f"{plan.seq_len} tokens{shards}{ckpt}"
    )
    if budget is None:
        where = (
            "no GPU" if spec.resources.gpus == 0 else "GPU memory unknown: set resources.gpuMemory"
        )
        est.message = f"needs ~{_gib(est.total)} GiB per process ({what}; {where})"
        return est
    if est.fits:
        est.message = f"needs ~{_gib(est.total)} GiB per GPU, have {_gib(budget)} ({what})"
        return est
    est.suggestions = suggestions(shape, est.plan, budget, requested is None)
    change = (
        "use " + ", or ".join(est.suggestions)
        if est.suggestions
        else "no single change found that fits: use larger GPUs or a smaller base model"
    )
    est.message = (
        f"needs ~{_gib(est.total)} GiB per GPU, have {_gib(budget)} ({source}; {what}): {change}"
    )
    return est


def describe(est: Estimate) -> str:
    """The parts in one line, largest first ("weights 27.0 GiB, activations 12.1 GiB, ...")."""
    parts = sorted(est.parts.items(), key=lambda kv: -kv[1])
    return ", ".join(
        f"{k} {_gib(v)} GiB" for k, v in parts if v >= 0.05 * GIB or k == "activations"
    )


__all__ = [
    "GIB",
    "GPU_PRODUCTS",
    "Estimate",
    "ModelShape",
    "RunPlan",
    "UnsupportedModel",
    "describe",
    "estimate",
    "gpu_memory",
    "gpu_product_memory",
    "parse_quantity",
    "plan_from_spec",
    "preflight",
    "shape_from_config",
]
