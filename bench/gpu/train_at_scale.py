"""GPU-only parts of training at scale (issue 14), in one go: bf16 FSDP2 on NCCL, flash-attention,
QLoRA, and the kubetune trainer itself sharded on NCCL with a resume.

Usage (one node, every GPU; nothing is downloaded -- models are random-init from a config)::

    torchrun --standalone --nproc-per-node=$(nvidia-smi -L | wc -l) bench/gpu/train_at_scale.py
    torchrun --standalone --nproc-per-node=8 bench/gpu/train_at_scale.py --size 8b --seq 4096
    python bench/gpu/train_at_scale.py --dry-run      # CPU: arguments, model, one sharded step

Cases, each on the same model, batch and sequence length, measured in this process:

- ``unsharded-bf16`` (baseline): every GPU holds fp32 weights, gradients and AdamW state and
  computes under bf16 autocast -- what ``distributed.strategy: ddp`` does for full fine-tuning
  (gradients all-reduced with DDP when there is more than one GPU). May run out of memory:
  then it says so, which is the point of sharding.
- ``fsdp-bf16``: the trainer's own sharding (``kubetune_trainer.sharding.shard_model``): one
  FSDP2 unit per decoder layer, bf16 parameters, fp32 reduction, SDPA attention.
- ``fsdp-bf16-flash``: the same with ``attn_implementation="flash_attention_2"`` (skipped
  when the flash-attn package is not installed).
- ``fsdp-bf16-ckpt``: fsdp-bf16 with activation checkpointing (the trainer's
  ``enable_gradient_checkpointing``).
- ``qlora``: rank 0 alone, the base quantised to 4-bit NF4 by bitsandbytes, LoRA r=16 on every
  linear layer, bf16 compute (skipped without bitsandbytes).
- ``trainer-fsdp``: ``python -m kubetune_trainer train``'s Trainer on NCCL (full, strategy
  fsdp, bf16) for a few steps with a checkpoint, then a second run that resumes from it; checks
  that the resumed run ends on the same loss.

Limits: each GPU builds the whole fp32 model before sharding it (8b needs ~32 GB of one GPU
for a moment); an out-of-memory in the unsharded baseline is expected for large shapes and is
reported, not fatal.

Each case prints tokens/s (all GPUs), MFU (PaLM convention: 6N + 12·L·d·s FLOPs per token
against the GPU's dense bf16 peak) and peak memory (``torch.cuda.max_memory_allocated``, the
largest over ranks) next to the memory estimate of ``kubetune.finetune.memory`` for the same
run, when that module is installed (otherwise only the measured figure).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for sub in ("operator", "trainer-image"):
    if str(ROOT / sub) not in sys.path:
        sys.path.insert(0, str(ROOT / sub))

GIB = 1024**3

# Llama-architecture shapes (random init): (hidden, intermediate, layers, heads, kv heads, vocab).
SIZES = {
    "tiny": (64, 128, 2, 4, 2, 512),
    "1b": (2048, 8192, 16, 32, 8, 128256),  # Llama 3.2 1B
    "3b": (3072, 8192, 28, 24, 8, 128256),  # Llama 3.2 3B
    "8b": (4096, 14336, 32, 32, 8, 128256),  # Llama 3.1 8B
}

# Dense bf16 FLOP/s by device name (first match): datasheet figures without sparsity.
PEAK_BF16 = (
    ("H200", 989.4e12),
    ("H100", 989.4e12),
    ("H800", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)

CASES = (
    "unsharded-bf16",
    "fsdp-bf16",
    "fsdp-bf16-flash",
    "fsdp-bf16-ckpt",
    "qlora",
    "trainer-fsdp",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b", help="model shape (random init)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row")
    p.add_argument("--batch", type=int, default=4, help="rows per GPU per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument(
        "--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES)
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="dense bf16 TFLOP/s of one GPU (default: by name)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    p.add_argument(
        "--dry-run", action="store_true", help="CPU: build the tiny model and run one sharded step"
    )
    a = p.parse_args(argv)
    unknown = set(a.cases.split(",")) - set(CASES)
    if unknown:
        p.error(f"--cases: unknown {sorted(unknown)}; choose from {', '.join(CASES)}")
    if a.seq < 16 or a.batch < 1 or a.steps < 1 or a.warmup < 0:
        p.error("--seq >= 16, --batch >= 1, --steps >= 1, --warmup >= 0")
    return a


def llama_config(size: str, seq: int):
    """A transformers LlamaConfig of one of SIZES."""
    from transformers import LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max(seq, 512),
        tie_word_embeddings=False,
    )


def flops_per_token(config, seq: int) -> tuple[int, float]:
    """(N, training FLOPs per token): 6N over the non-embedding weights plus attention 12·L·d·s."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    n = layers * per_layer + h + config.vocab_size * h  # + final norm + output head
    return n, 6 * n + 12 * layers * h * seq


def peak_flops(name: str, override: float | None) -> float | None:
    """Dense bf16 FLOP/s of one GPU."""
    if override:
        return override * 1e12
    return next((f for key, f in PEAK_BF16 if key in name), None)


def estimate_gib(config, a, case: str, world: int) -> float | None:
    """kubetune.finetune.memory's figure for this case (None when the estimator is not installed)."""
    try:
        from kubetune.finetune import memory
    except ImportError:
        return None
    method = "qlora" if case == "qlora" else "full"
    try:
        shape = memory.shape_from_config(config.to_dict() | {"model_type": "llama"})
        plan = memory.RunPlan(
            method=method,
            batch_size=a.batch,
            seq_len=a.seq,
            world_size=1 if case == "qlora" else world,
            gpus=1,
            checkpointing=case.endswith("-ckpt"),
            precision="bf16",
            strategy="ddp" if case in ("unsharded-bf16", "qlora") else "fsdp",
        )
        return memory.estimate(shape, plan).total / GIB
    except Exception as exc:  # the estimator's API is another module's: report, don't die
        print(f"  (estimate unavailable: {type(exc).__name__}: {exc})")
        return None


# --- the cases ------------------------------------------------------------------------------


def build_model(config, device, case: str):
    """A random-init model for one case (QLoRA: saved, then loaded back quantised)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.sharding import shard_model
    from kubetune_trainer.train import enable_gradient_checkpointing

    torch.manual_seed(0)
    if case == "qlora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        folder = Path(tempfile.mkdtemp(prefix="bench-qlora-"))
        try:
            AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model = AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device}
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        return get_peft_model(model, lora), torch.bfloat16
    attn = "flash_attention_2" if case.endswith("-flash") else "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    model.to(device)
    if case.endswith("-ckpt"):
        enable_gradient_checkpointing(model)
    if case.startswith("fsdp"):
        shard_model(model, device, torch.bfloat16 if device.type == "cuda" else None)
        return model, None  # the mixed-precision policy computes in bf16
    if (
        case == "unsharded-bf16"
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    ):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index]), torch.bfloat16
    return model, torch.bfloat16 if device.type == "cuda" else None


def train_steps(model, autocast, config, a, device, steps: int, together: bool = True) -> float:
    """``steps`` AdamW steps on random tokens; returns the seconds they took.

    ``together``: every rank runs this (the clock starts and stops at a barrier).
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    gen = torch.Generator(device="cpu").manual_seed(1)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext()

    def step():
        ids = torch.randint(0, config.vocab_size, (a.batch, a.seq), generator=gen).to(device)
        with ctx:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    sync(device, together)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device, together)
    return time.perf_counter() - started


def sync(device, together: bool) -> None:
    """Wait for the GPU (and, together, every rank)."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if together and dist.is_initialized():
        dist.barrier()


def run_case(case: str, config, a, device, world: int, rank: int) -> dict:
    """One row: tokens/s, MFU, peak memory, estimate (or why it was skipped)."""
    import torch
    import torch.distributed as dist

    row: dict = {"case": case}
    if case.endswith("-flash") and importlib.util.find_spec("flash_attn") is None:
        return {**row, "skipped": "flash-attn is not installed"}
    if case == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        return {**row, "skipped": "bitsandbytes is not installed"}
    if case == "trainer-fsdp":
        return {**row, **trainer_case(a, device, world, rank)}
    solo = case == "qlora"  # one GPU: the other ranks wait
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    error = None
    seconds = None
    if not solo or rank == 0:
        try:
            model, autocast = build_model(config, device, case)
            seconds = train_steps(model, autocast, config, a, device, a.steps, together=not solo)
            del model
        except torch.OutOfMemoryError as exc:
            error = f"out of memory: {str(exc).splitlines()[0][:120]}"
    if dist.is_initialized():
        # Everyone learns whether anyone failed, so no rank waits in a collective alone.
        flag = torch.tensor([1 if error else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not error:
            error = "another rank ran out of memory"
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    if dist.is_initialized() and peak is not None:
        t = torch.tensor([peak], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        peak = float(t)
    row["peak_gib"] = round(peak, 2) if peak is not None else None
    est = estimate_gib(config, a, case, world)
    row["estimate_gib"] = round(est, 2) if est is not None else None
    if error:
        return {**row, "error": error}
    gpus = 1 if solo else world
    if rank == 0 and seconds:
        tokens = a.batch * a.seq * a.steps * gpus
        row["tokens_per_s"] = round(tokens / seconds, 1)
        n, fpt = flops_per_token(config, a.seq)
        peak_f = peak_flops(
            torch.cuda.get_device_name(device) if device.type == "cuda" else "", a.peak_tflops
        )
        row["mfu"] = round(row["tokens_per_s"] * fpt / (peak_f * gpus), 4) if peak_f else None
    return row


def trainer_case(a, device, world: int, rank: int) -> dict:
    """The kubetune Trainer itself on this process group: 6 steps, then a resume from step 4."""
    import torch.distributed as dist

    from kubetune.api.finetunejob import FineTuneJobSpec
    from kubetune_trainer import synthetic
    from kubetune_trainer.settings import Distributed, Settings
    from kubetune_trainer.train import Trainer

    root = Path(tempfile.gettempdir()) / "kubetune-bench-trainer"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        synthetic.build_base_model(
            root / "base", seed=0, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4
        )
        synthetic.write_task_dataset(root / "train.jsonl", 400, seed=1)
    if dist.is_initialized():
        dist.barrier()
    losses = []
    for run, steps in (("straight", 6), ("resumed", 6)):
        out = root / ("out-straight" if run == "straight" else "out-resumed")
        if run == "resumed" and rank == 0:
            # The straight run's checkpoint of step 4 alone: the second run resumes from it.
            shutil.copytree(root / "out-straight/checkpoints/step-4", out / "checkpoints/step-4")
            shutil.copytree(root / "out-straight/data", out / "data")
        if dist.is_initialized():
            dist.barrier()
        spec = FineTuneJobSpec.model_validate(
            {
                "baseModel": {"uri": (root / "base").as_uri()},
                "dataset": {"train": (root / "train.jsonl").as_uri(), "validationSplit": 0.0},
                "method": {"type": "full"},
                "distributed": {"strategy": "fsdp"},
                "hyperparameters": {
                    "maxSteps": steps,
                    "batchSize": 8,
                    "learningRate": 1e-4,
                    "precision": "bf16",
                },
                "checkpoint": {"everySteps": 2, "keepLast": 3},
                "output": {"uri": out.as_uri()},
                "resources": {"gpus": 1},
            }
        )
        settings = Settings(
            spec=spec,
            work_dir=root / f"work-{run}",
            dist=Distributed(world, rank, int(os.environ.get("LOCAL_RANK", "0"))),
        )
        started = time.perf_counter()
        outcome = Trainer(settings).run()
        losses.append(outcome.metrics.get("trainLoss"))
        seconds = time.perf_counter() - started
    same = losses[0] == losses[1]
    return {"train_loss": losses, "resumed_equal": same, "seconds": round(seconds, 1)} | (
        {} if same else {"error": f"resumed run ended on loss {losses[1]}, straight {losses[0]}"}
    )


# --- main -----------------------------------------------------------------------------------


def dry_run(a) -> int:
    """CPU: parse, build the chosen config and the tiny model, shard it in a group of one, one step."""
    import torch
    import torch.distributed as dist

    config = llama_config(a.size, a.seq)
    n, fpt = flops_per_token(config, a.seq)
    print(
        f"dry run: {a.size} = {n / 1e9:.2f}B weights (non-embedding + head), {fpt / 1e9:.1f} GFLOP per token"
    )
    for case in a.cases.split(","):
        need = {"fsdp-bf16-flash": "flash_attn", "qlora": "bitsandbytes"}.get(case)
        here = need is None or importlib.util.find_spec(need) is not None
        print(f"  {case}: {'runnable' if here else f'skipped here ({need} not installed)'}")
    tiny = llama_config("tiny", 64)
    small = argparse.Namespace(**{**vars(a), "seq": 64, "batch": 2, "warmup": 0})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        device = torch.device("cpu")
        for case in ("fsdp-bf16", "fsdp-bf16-ckpt", "unsharded-bf16"):
            model, autocast = build_model(tiny, device, case)
            seconds = train_steps(model, autocast, tiny, small, device, 1)
            print(f"  {case} on the tiny model, CPU: one step in {seconds:.2f}s")
        # What the memory pre-flight expects of the chosen shape on 8 GPUs (the real run
        # prints these next to the measured peaks).
        ests = {
            c: estimate_gib(config, a, c, 8)
            for c in ("unsharded-bf16", "fsdp-bf16", "fsdp-bf16-ckpt", "qlora")
        }
        if all(v is None for v in ests.values()):
            print("  estimates: n/a (kubetune.finetune.memory not installed)")
        else:
            print(
                "  estimates per GPU, 8 GPUs: "
                + ", ".join(f"{c} {v:.1f} GiB" for c, v in ests.items() if v is not None)
            )
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run every case on every GPU of this torchrun group; rank 0 prints the table."""
    a = parse_args(argv)
    if a.dry_run:
        return dry_run(a)
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available():
        print("no CUDA GPU: this script measures GPUs only (use --dry-run on CPU)", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    if world > 1:
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group(
            "nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device
        )
    config = llama_config(a.size, a.seq)
    n, _ = flops_per_token(config, a.seq)
    rows = []
    if rank == 0:
        print(
            f"{torch.cuda.get_device_name(device)} x {world}, torch {torch.__version__}; {a.size} "
            f"({n / 1e9:.2f}B), batch {a.batch} x {a.seq} tokens per GPU, {a.steps} steps after {a.warmup}"
        )
        print(f"{'case':<18}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'estimate':>10}  note")
    for case in a.cases.split(","):
        row = run_case(case, config, a, device, world, rank)
        rows.append(row)
        if rank == 0:
            note = row.get("skipped") or row.get("error") or ""
            if case == "trainer-fsdp" and not note:
                note = f"resumed run ends on the same loss ({row['train_loss'][1]})"
            mfu = f"{row['mfu']:.1%}" if row.get("mfu") is not None else "-"
            tps = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else "-"
            peak = f"{row['peak_gib']:.1f}" if row.get("peak_gib") is not None else "-"
            est = f"{row['estimate_gib']:.1f}" if row.get("estimate_gib") is not None else "n/a"
            print(f"{case:<18}{tps:>12}{mfu:>8}{peak:>10}{est:>10}  {note}", flush=True)
    base = next((r for r in rows if r["case"] == "unsharded-bf16" and r.get("tokens_per_s")), None)
    ours = next((r for r in rows if r["case"] == "fsdp-bf16" and r.get("tokens_per_s")), None)
    if rank == 0 and base and ours:
        print(
            f"fsdp-bf16 vs unsharded-bf16: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
            f"{ours['peak_gib'] / base['peak_gib']:.2f}x peak memory"
        )
    if rank == 0 and a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")
    dist.destroy_process_group()
    failed = [r["case"] for r in rows if r.get("error") and r["case"] != "unsharded-bf16"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
