"""``python -m kubetune_trainer train``: LoRA, QLoRA or full fine-tuning with exact resume.

A lean loop over transformers + peft (no ``Trainer``): every optimiser step is
``accum`` micro-batches from :mod:`kubetune_trainer.batching` (a pure function of the step), the
loss is summed over target tokens and divided by the step's target-token count (so gradient
accumulation equals one big batch), then clipping, AdamW and the scheduler. Around it:

- resume: before the first step the newest verified checkpoint is restored (weights, optimizer,
  scheduler, RNG, data position) and training continues at its step -- same batches, same
  dropout masks, same schedule as if it had never stopped;
- evaluation every ``evaluation.everySteps`` and at the end: eval loss, perplexity, exact-match
  accuracy of greedy answers on up to ``ACCURACY_SAMPLES`` validation examples; early stopping;
- checkpoints every ``checkpoint.everySteps`` (:mod:`kubetune_trainer.checkpoints`) and on
  SIGTERM (after the current step: exit 143 once the checkpoint is stored);
- progress to the status channel; on success, the artifact (:mod:`kubetune_trainer.artifact`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.api.answers import EXACT, is_correct
from kubetune.api.finetunejob import LoraSpec, resolve_strategy
from kubetune.api.times import now_rfc3339
from kubetune_trainer.artifact import Publication, publish
from kubetune_trainer.batching import BLOCK, VARLEN, BatchPlan, collate, make_rows, real_tokens
from kubetune_trainer.checkpoints import CheckpointManager, read_state
from kubetune_trainer.encoding import IGNORE, encode_record, prompt_ids
from kubetune_trainer.errors import ConfigError, DataError, Preempted
from kubetune_trainer.reporting import MAX_CHECKPOINTS_REPORTED, make_reporter
from kubetune_trainer.settings import Settings
from kubetune_trainer.sources import fetch_model, output_store
from kubetune_trainer.validate import load_validated

log = logging.getLogger("kubetune_trainer.train")

ACCURACY_SAMPLES = 32
MAX_ANSWER_TOKENS = 16


@dataclass
class Outcome:
    """What a successful run reports in its termination message."""

    message: str
    step: int
    metrics: dict[str, Any]
    data_report: dict[str, Any] | None
    artifact: dict[str, Any] | None


@dataclass
class TrainState:
    """Everything besides tensors that a checkpoint must restore."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    best_eval_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False

    def dump(self) -> dict[str, Any]:
        """JSON form (trainer_state.json)."""
        return dict(self.__dict__)


class SigtermFlag:
    """Records SIGTERM instead of dying, so the loop can finish its step and checkpoint."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def install(self) -> None:
        """Take over SIGTERM (main thread only)."""
        with contextlib.suppress(ValueError):
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        log.warning("SIGTERM: finishing the current step, then checkpointing")
        self.raised = True

    def restore(self) -> None:
        """Give SIGTERM back."""
        if self._previous is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._previous)


# --- model ----------------------------------------------------------------------------------


def pick_device_and_dtype(settings: Settings):
    """``(device, autocast dtype or None, load dtype)`` from precision and the hardware."""
    import torch

    spec = settings.spec
    precision = spec.hyperparameters.precision
    cuda = torch.cuda.is_available() and spec.resources.gpus > 0
    device = torch.device(f"cuda:{settings.dist.local_rank}" if cuda else "cpu")
    if precision == "auto":
        if cuda:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("hyperparameters.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    # LoRA keeps the frozen base in the compute dtype (half the memory); full fine-tuning keeps
    # fp32 master weights and computes under autocast.
    load = amp if (amp is not None and spec.method.type != "full") else torch.float32
    return device, amp, load, precision


def attention_for(device, load_dtype) -> str:
    """flash_attention_2 where it can run (CUDA, half-precision weights, flash-attn installed), else sdpa.

    Packed rows are kept apart either way (kubetune_trainer.batching): flash-attention through
    its variable-length kernel, SDPA through a block-diagonal mask.
    """
    import importlib.util

    import torch

    if (
        device.type == "cuda"
        and load_dtype in (torch.bfloat16, torch.float16)
        and importlib.util.find_spec("flash_attn") is not None
    ):
        return "flash_attention_2"
    return "sdpa"


def packed_attention_for(model) -> str:
    """How collate keeps packed examples apart for this model's attention kernel."""
    impl = getattr(model.config, "_attn_implementation", None)
    return VARLEN if impl and impl.startswith("flash_attention") else BLOCK


def load_model(settings: Settings, base_dir: Path, device, load_dtype):
    """The base model, wrapped with a LoRA adapter unless method.type is full."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = settings.spec
    kwargs: dict[str, Any] = {
        "dtype": load_dtype,
        "attn_implementation": attention_for(device, load_dtype),
    }
    if spec.method.type == "qlora":
        if device.type != "cuda":
            raise ConfigError(
                "method.type qlora needs a CUDA GPU (4-bit quantisation runs through bitsandbytes on "
                "GPUs only) and this pod has none: set resources.gpus >= 1 or use method.type lora"
            )
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as exc:
            raise ConfigError(
                f"method.type qlora needs the bitsandbytes package in the trainer image: {exc}"
            ) from exc
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=load_dtype if load_dtype != torch.float32 else torch.bfloat16,
        )
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if spec.method.type != "qlora":
        model.to(device)
    if spec.method.type == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    if spec.method.type == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = spec.method.lora or LoraSpec()
    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"method.lora.targetModules {targets}: {exc}") from exc
    return model


def wants_gradient_checkpointing(spec, memory_estimate: dict[str, Any] | None = None) -> bool:
    """``hyperparameters.gradientCheckpointing`` with unset resolved.

    Unset means "where the memory needs it": the validation step's memory estimate
    (``memoryEstimate.gradientCheckpointing`` of data/report.json) turned it on when the run does
    not fit the GPU without it; with no estimate, unset is off (recomputing every layer costs
    about a third more compute).
    """
    flag = spec.hyperparameters.gradient_checkpointing
    if flag is not None:
        return bool(flag)
    return bool((memory_estimate or {}).get("gradientCheckpointing"))


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoints).

    NB: the non-reentrant form needs no ``requires_grad`` on the inputs (frozen embeddings under
    LoRA), works under FSDP2, and restores the RNG state for the recompute, so dropout masks --
    and therefore losses -- are the same as without checkpointing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    except ValueError as exc:
        raise ConfigError(f"hyperparameters.gradientCheckpointing: {exc}") from exc


def check_fsdp(spec, precision: str) -> None:
    """What distributed.strategy fsdp does not cover, refused before anything is downloaded."""
    if spec.method.type == "qlora":
        raise ConfigError(
            "distributed.strategy fsdp applies to method.type full and lora; qlora's 4-bit base "
            "trains with ddp (set distributed.strategy to auto or ddp)"
        )
    if spec.output.merge_adapter:
        raise ConfigError(
            "output.mergeAdapter needs the whole base model in one process and distributed.strategy "
            "fsdp shards it: set distributed.strategy ddp, or merge the published adapter afterwards"
        )
    if precision == "fp16":
        raise ConfigError(
            "hyperparameters.precision fp16 with distributed.strategy fsdp: the loss scaler would "
            "have to see every shard; use bf16 (Ampere or newer GPUs) or distributed.strategy ddp"
        )


def trainable_state(model) -> dict[str, Any]:
    """The trainable parameters by name (what a checkpoint must keep)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model, spec, device):
    """AdamW; weight decay on matrices only (not on biases and norms)."""
    import torch

    hp = spec.hyperparameters
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": hp.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=hp.learning_rate, betas=(0.9, 0.999), eps=1e-8, **extra)


def make_scheduler(optimizer, spec, total_steps: int):
    """Warmup then cosine / linear / constant."""
    from transformers import get_scheduler

    hp = spec.hyperparameters
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[
        hp.scheduler
    ]
    warmup = math.ceil(hp.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


# --- RNG -------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    with contextlib.suppress(ImportError):
        import numpy

        state["numpy"] = numpy.random.get_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_cpu(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor cloned to the CPU."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy

        numpy.random.seed(seed % (2**32))


# --- the trainer -----------------------------------------------------------------------------


class Trainer:
    """One training run (see the module docstring). ``run()`` returns the Outcome."""

    def __init__(self, settings: Settings, context: dict[str, Any] | None = None):
        self.settings = settings
        self.spec = settings.spec
        self.context = context if context is not None else {}
        self.sigterm = SigtermFlag()
        main = settings.dist.is_main
        self.reporter = make_reporter(
            settings.report if main else "none", settings.namespace, settings.job_name
        )
        self.store = output_store(self.spec.output.uri, self.spec.storage)
        self.work_dir = Path(settings.work_dir)
        if settings.dist.enabled:
            # Processes of one pod share the emptyDir: each stages in its own folder.
            self.work_dir = self.work_dir / f"rank-{settings.dist.rank}"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.strategy = resolve_strategy(self.spec)
        self.fsdp = self.strategy == "fsdp"
        # A process group exists (run_train makes one of one process for fsdp alone).
        self.distributed = settings.dist.enabled or self.fsdp
        self.state = TrainState()
        self.resumed_from: int | None = None
        self.last_saved_step: int | None = None
        self.started_at = now_rfc3339()
        self.step_times: list[float] = []
        self.checkpoint_stall: list[float] = []

    # -- setup --

    def setup(self) -> None:
        """Data, model, optimizer, scheduler, checkpoints (and resume)."""
        import torch
        from transformers import AutoTokenizer

        spec = self.spec
        hp = spec.hyperparameters
        self.device, self.amp, load_dtype, self.precision = pick_device_and_dtype(self.settings)
        if spec.method.type == "qlora" and self.device.type != "cuda":
            # Fail before downloading anything.
            load_model(self.settings, Path("."), self.device, load_dtype)
        if self.fsdp:
            check_fsdp(spec, self.precision)
        # Under FSDP on GPU the mixed-precision policy computes in bf16; autocast elsewhere.
        self.autocast = None if (self.fsdp and self.device.type == "cuda") else self.amp
        d = self.settings.dist
        # One download per pod: its first process fetches into the shared work folder, the
        # others wait at the barrier and reuse it.
        if d.enabled and d.local_rank != 0:
            barrier()
        self.base_dir = fetch_model(spec.base_model.uri, spec.storage, Path(self.settings.work_dir))
        if d.enabled and d.local_rank == 0:
            barrier()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.settings.dist.enabled and not self.settings.dist.is_main:
            barrier()  # rank 0 validates (when needed) and writes data/ first
        self.data = load_validated(self.settings, tokenizer=self.tokenizer)
        if self.settings.dist.enabled and self.settings.dist.is_main:
            barrier()
        self.context["dataReport"] = self.data.summary
        max_len = spec.dataset.max_seq_length
        encoded = [
            encode_record(self.tokenizer, r, self.data.format, max_len) for r in self.data.train
        ]
        encoded = [e for e in encoded if any(label != IGNORE for label in e.labels[1:])]
        self.rows = make_rows(encoded, max_len, spec.dataset.packing, hp.seed)
        self.eval_rows = make_rows(
            [
                encode_record(self.tokenizer, r, self.data.format, max_len)
                for r in self.data.validation
            ],
            max_len,
            False,
            hp.seed,
        )
        world = self.settings.dist.world_size
        if len(self.rows) < hp.batch_size * world:
            raise DataError(
                f"{len(self.rows)} training rows cannot fill one batch of {hp.batch_size} on each of "
                f"{world} processes: add data or lower hyperparameters.batchSize"
            )
        # One global micro-batch of batchSize rows per process; rank r trains on slice r.
        self.plan = BatchPlan(len(self.rows), hp.batch_size * world, hp.seed)
        self.accum = hp.gradient_accumulation_steps
        steps_per_epoch = math.ceil(self.plan.batches_per_epoch / self.accum)
        self.total_steps = hp.max_steps or max(1, math.ceil(hp.epochs * steps_per_epoch))

        seed_everything(hp.seed)
        self.model = load_model(self.settings, self.base_dir, self.device, load_dtype)
        self.packed_attention = packed_attention_for(self.model)
        self.gradient_checkpointing = wants_gradient_checkpointing(spec, self.data.memory)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.ddp = None
        if self.fsdp:
            import torch.distributed as dist

            from kubetune_trainer.sharding import GroupPeers, shard_model

            units = shard_model(self.model, self.device, self.amp)
            log.info("fsdp: %d decoder layers sharded over %d processes", units, d.world_size)
            # Checkpoints talk over their own gloo group, from a background thread: never on
            # the training communicator, which the next steps keep busy.
            self.ckpt_group = dist.new_group(backend="gloo")
            self.peers = GroupPeers(self.ckpt_group)
        elif self.settings.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.optimizer = make_optimizer(self.model, spec, self.device)
        self.scheduler = make_scheduler(self.optimizer, spec, self.total_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        n_train = sum(p.numel() for p in trainable_state(self.model).values())
        n_all = sum(p.numel() for p in self.model.parameters())
        log.info(
            "%s on %s (%s%s): %d rows (%s), %d steps, %d/%d trainable parameters",
            spec.method.type,
            self.device,
            self.precision,
            ", gradient checkpointing" if self.gradient_checkpointing else "",
            len(self.rows),
            "packed" if spec.dataset.packing else "padded",
            self.total_steps,
            n_train,
            n_all,
        )
        self.checkpoints = CheckpointManager(
            self.store,
            self.work_dir,
            spec.checkpoint.keep_last,
            spec.checkpoint.keep_best,
            self._on_checkpoint,
        )
        self.resume()

    def load_weights(self, folder: Path, step: int) -> None:
        """Copy a checkpoint's trainable weights into the model."""
        import torch
        from safetensors.torch import load_file

        if self.fsdp:
            from kubetune_trainer.sharding import load

            load(self.model, None, folder, f"checkpoint step-{step}")
            return
        weights = load_file(folder / "weights.safetensors", device=str(self.device))
        params = trainable_state(self.model)
        if set(weights) != set(params):
            raise ConfigError(
                f"checkpoint step-{step} does not match this model (method or targetModules changed?): "
                f"{len(set(weights) ^ set(params))} parameter names differ; delete "
                f"{self.checkpoints.store.uri_for('checkpoints')} to start over"
            )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights[name])

    def select_best(self) -> int:
        """The step whose weights are published (checkpoint.keepBest: the best evaluated checkpoint).

        With keepBest, when an earlier checkpoint had a lower eval loss than the final weights
        (typically after early stopping), its weights are loaded and published instead; a best
        evaluation that fell between checkpoints cannot be recovered and the final weights go out.
        """
        st = self.state
        final = st.metrics.get("evalLoss")
        if not (
            self.spec.checkpoint.keep_best
            and st.best_step is not None
            and st.best_step != st.step
            and final is not None
            and st.best_eval_loss is not None
            and st.best_eval_loss < final
        ):
            return st.step
        if st.best_step not in {c.step for c in self.checkpoints.complete()}:
            log.info(
                "the best eval loss (step %d) has no checkpoint (evaluation.everySteps and "
                "checkpoint.everySteps did not meet there): publishing the final weights",
                st.best_step,
            )
            return st.step
        if self.fsdp:
            folder = self.fetch_per_pod(st.best_step, "best")
        else:
            folder = self.checkpoints.fetch(st.best_step, self.work_dir / "best")
        self.check_layout(folder, st.best_step)
        self.load_weights(folder, st.best_step)
        log.info(
            "publishing the best checkpoint, step %d (eval loss %s < final %s)",
            st.best_step,
            st.best_eval_loss,
            final,
        )
        return st.best_step

    def resume(self) -> None:
        """Restore the newest verified checkpoint, if any."""
        import torch

        found = self.find_resume_folder()
        if found is None:
            return
        step, folder = found
        started = time.perf_counter()
        self.check_layout(folder, step)
        if self.fsdp:
            from kubetune_trainer.sharding import load

            load(self.model, self.optimizer, folder, f"checkpoint step-{step}")
        else:
            self.load_weights(folder, step)
            self.optimizer.load_state_dict(
                torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=False)
            )
        sched = torch.load(folder / "scheduler.pt", weights_only=False)
        self.scheduler.load_state_dict(sched["scheduler"])
        if self.scaler is not None and sched.get("scaler"):
            self.scaler.load_state_dict(sched["scaler"])
        state = read_state(folder)
        self.state = TrainState(**state["train"])
        rng = torch.load(folder / "rng.pt", weights_only=False)
        d = self.settings.dist
        if rng.get("worldSize") == d.world_size:
            set_rng_state(rng["ranks"][d.rank])
        else:
            log.warning(
                "checkpoint step-%d was written by %s processes, this run has %d: weights, optimizer "
                "and data position resume exactly, the dropout RNG is re-seeded",
                step,
                rng.get("worldSize"),
                d.world_size,
            )
            seed_everything(self.spec.hyperparameters.seed + step)
        self.resumed_from = step
        self.resume_seconds = time.perf_counter() - started
        log.info("resumed from checkpoint step-%d (%.2fs)", step, self.resume_seconds)
        self.reporter.report({"resumedFromStep": step, "progress": self._progress()}, urgent=True)

    def find_resume_folder(self) -> tuple[int, Path] | None:
        """``(step, local folder)`` of the newest verified checkpoint, or None.

        A sharded run needs the whole checkpoint in every pod (a rank reads whichever shards
        its new layout needs): rank 0 chooses the step, the first process of every other pod
        downloads and verifies that one, the pod's other processes share it.
        """
        if not self.fsdp:
            found = self.checkpoints.latest_verified(self.work_dir / "resume")
            return None if found is None else (found[0].step, found[1])
        import torch.distributed as dist

        shared = Path(self.settings.work_dir) / "resume"
        choice: list[Any] = [None]
        if self.settings.dist.is_main:
            found = self.checkpoints.latest_verified(shared)
            choice = [None if found is None else found[0].step]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return None
        return choice[0], self.fetch_per_pod(
            choice[0], "resume", fetched=self.settings.dist.is_main
        )

    def fetch_per_pod(self, step: int, name: str, fetched: bool = False) -> Path:
        """Checkpoint ``step`` verified in the pod's shared work folder (one download per pod)."""
        shared = Path(self.settings.work_dir) / name
        if self.settings.dist.local_rank == 0 and not fetched:
            self.checkpoints.fetch(step, shared)
        barrier()
        return self.checkpoints.local_path(step, shared)

    def check_layout(self, folder: Path, step: int) -> None:
        """Refuse a checkpoint written under the other strategy (its files are not these)."""
        written = read_state(folder).get("strategy", "ddp")
        if written != self.strategy:
            raise ConfigError(
                f"checkpoint step-{step} was written with distributed.strategy {written} and this run "
                f"uses {self.strategy}: set distributed.strategy: {written} to resume it, or delete "
                f"{self.checkpoints.store.uri_for('checkpoints')} to start over"
            )

    # -- the loop --

    def run(self) -> Outcome:
        """Train to the end (or early stop), then publish."""
        self.sigterm.install()
        try:
            self.setup()
            self.loop()
            return self.finish()
        finally:
            self.sigterm.restore()
            with contextlib.suppress(Exception):
                self.checkpoints.close()
            self.reporter.close()

    def loop(self) -> None:
        """Optimiser steps until total_steps, early stop or SIGTERM."""
        spec = self.spec
        every_eval = spec.evaluation.every_steps
        every_ckpt = spec.checkpoint.every_steps
        while self.state.step < self.total_steps and not self.state.stopped_early:
            if self.sigterm_everywhere():
                self.preempt()
            t0 = time.perf_counter()
            loss, tokens = self.train_step(self.state.step)
            dt = time.perf_counter() - t0
            self.state.step += 1
            self.state.tokens_seen += tokens
            self.state.train_seconds += dt
            self.step_times.append(dt)
            self.state.metrics["trainLoss"] = round(loss, 6)
            self.context["step"] = self.state.step
            self.context["metrics"] = self.state.metrics
            step = self.state.step
            evaluated = False
            if self.data.validation and (step % every_eval == 0 or step == self.total_steps):
                self.evaluate()
                evaluated = True
            tps = tokens / dt if dt > 0 else None
            self.reporter.report(
                {"progress": self._progress(tps), "metrics": dict(self.state.metrics)},
                urgent=evaluated,
            )
            if step % every_ckpt == 0 and step < self.total_steps and not self.state.stopped_early:
                t1 = time.perf_counter()
                self.save_checkpoint()
                self.checkpoint_stall.append(time.perf_counter() - t1)
            if self.sigterm_everywhere():
                self.preempt()

    def train_step(self, step: int) -> tuple[float, int]:
        """One optimiser step; returns (mean loss per target token, tokens processed)."""
        import torch

        model = self.model
        model.train()
        batches = [
            collate(
                [self.rows[i] for i in self.my_slice(self.plan.indices(step * self.accum + m))],
                self.tokenizer.pad_token_id,
                self.packed_attention,
            )
            for m in range(self.accum)
        ]
        # HF shifts labels by one: position t predicts labels[t+1].
        targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        targets_t = torch.tensor(targets, device=self.device)
        if self.distributed:
            import torch.distributed as dist

            # Normalise by the GLOBAL target count; DDP averages gradients over ranks, so the
            # loss is scaled back up by the world size.
            dist.all_reduce(targets_t)
        targets_t = targets_t.clamp(min=1)
        scale = self.settings.dist.world_size
        total_loss = 0.0
        tokens = 0
        for m, batch in enumerate(batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            tokens += real_tokens(batch)
            ctx = (
                torch.autocast(self.device.type, dtype=self.autocast)
                if self.autocast is not None
                else contextlib.nullcontext()
            )
            # DDP all-reduces gradients only on the last micro-batch of the step. FSDP
            # reduce-scatters after every micro-batch: skipping it would keep unsharded
            # gradients, the memory sharding is there to save.
            sync = (
                self.ddp.no_sync()
                if self.ddp is not None and m < len(batches) - 1
                else contextlib.nullcontext()
            )
            with ctx, sync:
                out = (self.ddp or model)(**batch, num_items_in_batch=targets_t, use_cache=False)
                loss = out.loss * scale
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            total_loss += float(loss.detach()) / scale
        hp = self.spec.hyperparameters
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if hp.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], hp.max_grad_norm
            )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.distributed:
            import torch.distributed as dist

            stats = torch.tensor([total_loss, float(tokens)], device=self.device)
            dist.all_reduce(stats)
            total_loss, tokens = float(stats[0]), int(stats[1])
        return total_loss, tokens

    def my_slice(self, indices: list[int]) -> list[int]:
        """This process' share of a global micro-batch."""
        d = self.settings.dist
        if not d.enabled:
            return indices
        per = self.spec.hyperparameters.batch_size
        mine = indices[d.rank * per : (d.rank + 1) * per]
        # The last micro-batch of an epoch can be short: a rank left without rows re-uses the
        # first row of the batch (its gradient counts like any other row's).
        return mine or indices[:1]

    def sigterm_everywhere(self) -> bool:
        """Whether any process got SIGTERM (all ranks must checkpoint at the same step)."""
        if not self.distributed:
            return self.sigterm.raised
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.sigterm.raised else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- evaluation --

    def evaluate(self) -> dict[str, Any]:
        """Eval loss / perplexity / exact match on the validation split; updates early stopping."""
        import torch

        model = self.model
        model.eval()
        bs = self.spec.hyperparameters.batch_size
        loss_sum, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(self.eval_rows), bs):
                batch = collate(self.eval_rows[i : i + bs], self.tokenizer.pad_token_id)
                batch = {k: v.to(self.device) for k, v in batch.items()}
                n = int((batch["labels"][:, 1:] != IGNORE).sum())
                if n == 0:
                    continue
                ctx = (
                    torch.autocast(self.device.type, dtype=self.autocast)
                    if self.autocast is not None
                    else contextlib.nullcontext()
                )
                with ctx:
                    out = model(
                        **batch,
                        num_items_in_batch=torch.tensor(n, device=self.device),
                        use_cache=False,
                    )
                loss_sum += float(out.loss) * n
                count += n
        metrics = self.state.metrics
        if count:
            eval_loss = loss_sum / count
            metrics["evalLoss"] = round(eval_loss, 6)
            metrics["evalPerplexity"] = round(math.exp(min(eval_loss, 50.0)), 4)
            min_delta = (
                self.spec.evaluation.early_stopping.min_delta
                if self.spec.evaluation.early_stopping
                else 0.0
            )
            if (
                self.state.best_eval_loss is None
                or eval_loss < self.state.best_eval_loss - min_delta
            ):
                self.state.best_eval_loss = round(eval_loss, 6)
                self.state.best_step = self.state.step
                self.state.bad_evals = 0
            else:
                self.state.bad_evals += 1
            metrics["bestEvalLoss"] = self.state.best_eval_loss
        accuracy = self.exact_match()
        if accuracy is not None:
            metrics["evalAccuracy"] = round(accuracy, 4)
        self.state.evals.append(
            {"step": self.state.step, **{k: metrics.get(k) for k in ("evalLoss", "evalAccuracy")}}
        )
        es = self.spec.evaluation.early_stopping
        if es is not None and self.state.bad_evals >= es.patience:
            log.info(
                "early stopping at step %d: no eval-loss improvement in %d evaluations",
                self.state.step,
                es.patience,
            )
            self.state.stopped_early = True
        model.train()
        log.info(
            "step %d eval: %s",
            self.state.step,
            json.dumps({k: metrics.get(k) for k in ("evalLoss", "evalAccuracy")}),
        )
        return metrics

    def exact_match(self) -> float | None:
        """Greedy exact-match accuracy on short-answer validation examples (None when none)."""
        import torch

        from kubetune_trainer.synthetic import record_to_example

        examples = []
        for record in self.data.validation:
            ex = record_to_example(record)
            if ex is None:
                continue
            answer_len = len(self.tokenizer(ex["answer"], add_special_tokens=False)["input_ids"])
            if answer_len <= MAX_ANSWER_TOKENS:
                examples.append(ex)
            if len(examples) >= ACCURACY_SAMPLES:
                break
        if not examples:
            return None
        prompts = [prompt_ids(self.tokenizer, ex["prompt"], self.data.format) for ex in examples]
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at the same column, where generation starts.
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        with torch.no_grad():
            ctx = (
                torch.autocast(self.device.type, dtype=self.autocast)
                if self.autocast is not None
                else contextlib.nullcontext()
            )
            with ctx:
                if self.fsdp:
                    from kubetune_trainer.sharding import greedy_decode

                    out = greedy_decode(
                        self.model, ids, mask, MAX_ANSWER_TOKENS, self.tokenizer.eos_token_id, pad
                    )
                else:
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=MAX_ANSWER_TOKENS,
                        do_sample=False,
                        eos_token_id=self.tokenizer.eos_token_id,
                        pad_token_id=pad,
                    )
        hits = 0
        for row, ex in zip(out[:, width:].tolist(), examples, strict=True):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            hits += is_correct(text, ex["answer"], EXACT)
        return hits / len(examples)

    # -- checkpoints --

    def save_checkpoint(self, wait: bool = False) -> None:
        """Capture this step's state and hand it to the checkpoint uploader."""
        import torch
        from safetensors.torch import save_file

        step = self.state.step
        if self.fsdp:
            # The previous checkpoint's collectives end before this one's begin (one group).
            self.checkpoints.wait()
            shards = self._save_shards(step)
        else:
            weights = {
                n: p.detach().to("cpu").contiguous().clone()
                for n, p in trainable_state(self.model).items()
            }
            # A snapshot on the CPU: serialising, hashing and uploading happen in the
            # background while the next steps run (and update the live tensors in place).
            optimizer = to_cpu(self.optimizer.state_dict())
        sched = {
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "scaler": copy.deepcopy(self.scaler.state_dict()) if self.scaler else None,
        }
        rng = {"worldSize": self.settings.dist.world_size, "ranks": [rng_state()]}
        main = self.settings.dist.is_main
        if self.distributed:
            import torch.distributed as dist

            # Every rank's RNG (dropout masks differ per rank); only rank 0 writes it.
            ranks: list[Any] = [None] * self.settings.dist.world_size
            dist.all_gather_object(ranks, rng["ranks"][0])
            rng["ranks"] = ranks
            if not main and not self.fsdp:
                return  # ddp: the weights are replicated, rank 0 writes the checkpoint
        train_state = {
            "train": json.loads(json.dumps(self.state.dump())),
            "dataPosition": {
                "microBatch": step * self.accum,
                "epoch": self.plan.epoch_of(step * self.accum),
            },
            "totalSteps": self.total_steps,
            "method": self.spec.method.type,
            "strategy": self.strategy,
            "time": now_rfc3339(),
        }

        def write(folder: Path) -> None:
            if self.fsdp:
                shards(folder)
            else:
                save_file(weights, str(folder / "weights.safetensors"))
                torch.save(optimizer, folder / "optimizer.pt")
            if main:
                torch.save(sched, folder / "scheduler.pt")
                torch.save(rng, folder / "rng.pt")
                (folder / "trainer_state.json").write_text(
                    json.dumps(train_state, indent=2, sort_keys=True), encoding="utf-8"
                )

        metrics = dict(self.state.metrics)
        # An eval loss belongs to a checkpoint only when the evaluation ran at this very step.
        if not (self.state.evals and self.state.evals[-1]["step"] == step):
            metrics.pop("evalLoss", None)
        peers = self.peers if self.fsdp else None
        self.checkpoints.save(step, write, {"metrics": metrics}, wait=wait, peers=peers)
        self.last_saved_step = step

    def _save_shards(self, step: int):
        """Start this rank's DCP write; returns ``write(folder)`` that finishes it into folder."""
        from kubetune_trainer.sharding import save_async

        out = self.work_dir / "sharded" / f"step-{step}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        # Returns once the shards are copied to CPU memory; the files are written meanwhile.
        future = save_async(self.model, self.optimizer, out, self.ckpt_group)

        def finish(folder: Path) -> None:
            future.result()
            for path in out.iterdir():
                os.replace(path, folder / path.name)
            shutil.rmtree(out, ignore_errors=True)

        return finish

    def _on_checkpoint(self, record: dict[str, Any]) -> None:
        records = self.checkpoints.records[-MAX_CHECKPOINTS_REPORTED:]
        self.reporter.report({"checkpoints": records}, urgent=True)

    def preempt(self) -> None:
        """SIGTERM: checkpoint the current step (unless it is the resumed one) and exit 143."""
        step = self.state.step
        if step > 0 and step not in (self.resumed_from, self.last_saved_step):
            self.save_checkpoint(wait=True)
        else:
            self.checkpoints.wait()
        where = (
            self.store.uri_for(f"checkpoints/step-{step}")
            if step
            else "no checkpoint (no step done)"
        )
        self.reporter.report({"progress": self._progress()}, urgent=True)
        raise Preempted(
            f"SIGTERM at step {step}: checkpoint {where}; the next attempt resumes from it"
        )

    # -- end --

    def _progress(self, tokens_per_second: float | None = None) -> dict[str, Any]:
        step, total = self.state.step, self.total_steps
        recent = self.step_times[-20:]
        eta = int(sum(recent) / len(recent) * (total - step)) if recent else None
        out: dict[str, Any] = {
            "step": step,
            "totalSteps": total,
            "epoch": round(self.plan.epoch_of(step * self.accum), 4),
            "percent": int(100 * step / total) if total else None,
            "updatedAt": now_rfc3339(),
        }
        if eta is not None:
            out["etaSeconds"] = eta
        if tokens_per_second:
            out["tokensPerSecond"] = round(
                tokens_per_second, 1
            )  # global: train_step sums over ranks
        return out

    def publication(self) -> Publication:
        """What publishing needs of this run (kubetune_trainer.artifact)."""
        st, settings = self.state, self.settings
        return Publication(
            spec=self.spec,
            store=self.store,
            model=self.model,
            tokenizer=self.tokenizer,
            work_dir=self.work_dir,
            base_dir=self.base_dir,
            image=settings.image,
            step=st.step,
            total_steps=self.total_steps,
            best_step=st.best_step,
            best_eval_loss=st.best_eval_loss,
            stopped_early=st.stopped_early,
            resumed_from=self.resumed_from,
            tokens_seen=st.tokens_seen,
            precision=self.precision,
            gradient_checkpointing=self.gradient_checkpointing,
            strategy=self.strategy,
            started_at=self.started_at,
            world_size=settings.dist.world_size,
            data_digest=self.data.digest,
            data_report_uri=self.data.summary.get("reportUri"),
            train_examples=len(self.data.train),
            validation_examples=len(self.data.validation),
            published_step=getattr(self, "published_step", st.step),
            metrics=dict(st.metrics),
            job={
                "name": settings.job_name,
                "namespace": settings.namespace,
                "uid": settings.job_uid,
                "attempt": settings.attempt,
            },
        )

    def finish(self) -> Outcome:
        """Wait for uploads, publish the artifact, report the end."""
        self.checkpoints.wait()
        weights = None
        if self.fsdp:
            from kubetune_trainer.sharding import full_weights

            # Every rank takes part: rank 0's pruning is over before anyone lists checkpoints,
            # then the best weights are loaded into every shard and gathered on rank 0.
            barrier()
            self.published_step = self.select_best()
            weights = full_weights(self.model, trainable_only=self.spec.method.type != "full")
        if not self.settings.dist.is_main:
            return Outcome(
                f"rank {self.settings.dist.rank} done",
                self.state.step,
                dict(self.state.metrics),
                None,
                None,
            )
        if not self.fsdp:
            self.published_step = self.select_best()
        artifact = publish(self.publication(), weights)
        metrics = dict(self.state.metrics)
        self.reporter.report(
            {"progress": {**self._progress(), "percent": 100, "etaSeconds": 0}, "metrics": metrics},
            urgent=True,
        )
        how = (
            "early stopping"
            if self.state.stopped_early
            else f"{self.state.step}/{self.total_steps} steps"
        )
        resumed = (
            f", resumed from step {self.resumed_from}" if self.resumed_from is not None else ""
        )
        message = (
            f"trained {self.spec.method.type} ({how}{resumed}); evalLoss {metrics.get('evalLoss')}, "
            f"evalAccuracy {metrics.get('evalAccuracy')}; artifact {artifact['uri']}"
            + (
                f" (best checkpoint, step {self.published_step})"
                if self.published_step != self.state.step
                else ""
            )
        )
        return Outcome(message, self.state.step, metrics, self.data.summary, artifact)


def run_train(settings: Settings, context: dict[str, Any] | None = None) -> Outcome:
    """Entry point of ``python -m kubetune_trainer train``."""
    if not settings.dist.enabled and resolve_strategy(settings.spec) != "fsdp":
        return Trainer(settings, context).run()
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and settings.spec.resources.gpus > 0
    if cuda:
        torch.cuda.set_device(settings.dist.local_rank)
    backend = "nccl" if cuda else "gloo"
    if settings.dist.enabled:
        # torchrun sets MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE (from the operator's NNODES, ...).
        dist.init_process_group(backend=backend)
    else:
        # fsdp in a single process: a group of one, so that the sharded code path and the
        # checkpoint layout are the same at every size (a job may resume on more GPUs).
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        return Trainer(settings, context).run()
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """All processes meet here (no-op without torch.distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
