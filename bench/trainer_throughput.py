"""Trainer benchmarks: tokens/s vs a plain transformers Trainer + peft, checkpoint stall, resume time.

Usage (CPU, the figures in bench/RESULTS.md)::

    .venv/bin/python bench/trainer_throughput.py --model small --steps 40 --threads 2

GPU (0.5B-parameter Qwen2.5 architecture, random init, bf16 + LoRA; also reports MFU)::

    python bench/trainer_throughput.py --model qwen0.5b --device cuda --steps 30 --seq 1024 --batch 16

Sections, each measured in the same process on the same model, data and hyperparameters:

1. ``uniform``: the synthetic code-word task (short, similar lengths), LoRA, no packing. Ours vs
   ``transformers.Trainer`` + peft with ``DataCollatorForSeq2Seq`` (dynamic padding).
2. ``varlen``: a variable-length text dataset (8 to ~1000 tokens, log-uniform). Ours with
   packing (and without, for reference) vs the same baseline: packing removes the padding that
   the baseline computes on.
3. ``checkpoint stall``: our step time with a checkpoint every K steps vs none (ratio), and the
   share of it that the background upload hides.
4. ``resume``: seconds from start to the first resumed step, split into finding + verifying
   the checkpoint and restoring it, vs a fresh start.

Throughput counts real (non-padding) tokens per second of training-loop wall time, after
``--warmup`` steps. With ``--append`` the figures are appended to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer-image")]

H100_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100 SXM (and H200)


def build_model(kind: str, out: Path) -> Path:
    """A random-init model folder with the synthetic tokenizer."""
    from kubetune_trainer import synthetic

    if kind == "tiny":
        return synthetic.build_base_model(out)
    if kind == "small":
        return synthetic.build_base_model(
            out, hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4
        )
    if kind == "qwen0.5b":
        # Qwen2.5-0.5B's published architecture (config.json of Qwen/Qwen2.5-0.5B), random init.
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = synthetic.build_tokenizer()
        cfg = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return out
    raise SystemExit(f"unknown model {kind}")


def varlen_dataset(path: Path, n: int, max_words: int, seed: int = 0) -> Path:
    """Text records of log-uniform length (8 .. max_words words)."""
    from kubetune_trainer import synthetic

    rng = random.Random(seed)
    words = list(synthetic.KEYS + synthetic.VALUES) + ["the", "of", "and", "code", "word", "answer"]
    with path.open("w") as fh:
        for _ in range(n):
            k = int(math.exp(rng.uniform(math.log(8), math.log(max_words))))
            fh.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(k))}) + "\n")
    return path


def make_settings(base: Path, train: Path, out: Path, work: Path, a, **over):
    from kubetune_trainer.settings import Settings

    spec = {
        "baseModel": {"uri": base.as_uri()},
        "dataset": {
            "train": train.as_uri(),
            "validationSplit": 0.0,
            "maxSeqLength": a.seq,
            "packing": over.pop("packing", False),
        },
        "method": {
            "type": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]},
        },
        "hyperparameters": {
            "maxSteps": a.steps,
            "batchSize": a.batch,
            "learningRate": 1e-4,
            "scheduler": "constant",
            "warmupRatio": 0.0,
            "maxGradNorm": 1.0,
            "precision": "bf16" if a.device == "cuda" else "fp32",
        },
        "evaluation": {"everySteps": 100000},
        "checkpoint": {"everySteps": over.pop("ckpt_every", 100000), "keepLast": 2},
        "output": {"uri": out.as_uri()},
        "resources": {"gpus": 1 if a.device == "cuda" else 0},
    }
    env = {
        "KUBETUNE_SPEC": json.dumps(spec),
        "KUBETUNE_WORK_DIR": str(work),
        "KUBETUNE_REPORT": "none",
        "KUBETUNE_TERMINATION_LOG": str(work / "termination.json"),
    }
    return Settings.from_environ(env)


def run_ours(base, train, tmp: Path, a, name: str, **over):
    """Our trainer; returns (tokens/s after warmup, trainer)."""
    from kubetune_trainer.train import Trainer

    out, work = tmp / f"{name}-out", tmp / f"{name}-work"
    shutil.rmtree(out, ignore_errors=True)
    trainer = Trainer(make_settings(base, train, out, work, a, **over))
    trainer.tokens_per_step = []
    orig = trainer.train_step

    def counted(step):
        loss, tokens = orig(step)
        trainer.tokens_per_step.append(tokens)
        return loss, tokens

    trainer.train_step = counted
    trainer.run()
    w = a.warmup
    tps = sum(trainer.tokens_per_step[w:]) / sum(trainer.step_times[w:])
    return tps, trainer


def mask_cost(trainer, rounds: int = 6) -> dict[str, float]:
    """Forward + backward of the same packed micro-batches: block-diagonal mask vs a plain one.

    The plain padding mask is what packing used before (examples attending to each other); the
    two are timed alternately in this process, so machine load hits both alike.
    """
    import torch

    from kubetune_trainer.batching import collate

    tok = trainer.tokenizer.pad_token_id
    bs = trainer.spec.hyperparameters.batch_size
    batches = [collate(trainer.rows[i : i + bs], tok) for i in range(0, bs * 4, bs)]

    batches = [b for b in batches if b["attention_mask"].ndim == 4]  # packed ones only

    def plain(b):
        # 1 on every real token (the block mask's diagonal), 0 on padding
        real = b["attention_mask"][:, 0].diagonal(dim1=-2, dim2=-1)
        return {**b, "attention_mask": real.long()}

    variants = {"block": batches, "plain": [plain(b) for b in batches]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    model = trainer.model
    model.train()
    for _ in range(rounds):
        for name, bs_ in variants.items():
            t0 = time.perf_counter()
            for b in bs_:
                b = {k: v.to(trainer.device) for k, v in b.items()}
                model(**b, use_cache=False).loss.backward()
            model.zero_grad(set_to_none=True)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    block, plain_t = statistics.median(times["block"][1:]), statistics.median(times["plain"][1:])
    return {"block_s": block, "plain_s": plain_t, "ratio": block / plain_t}


def run_baseline(base: Path, trainer_ours, a, tmp: Path) -> float:
    """transformers.Trainer + peft on the same encoded examples and hyperparameters."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    # The same examples ours trained on, one per row, unpacked (the baseline has no packing).
    from kubetune_trainer.encoding import encode_record

    tok = trainer_ours.tokenizer
    rows = [encode_record(tok, r, trainer_ours.data.format, a.seq) for r in trainer_ours.data.train]
    ds = [
        {"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
        for e in rows
    ]
    mean_len = statistics.fmean(len(e.input_ids) for e in rows)
    cuda = a.device == "cuda"
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.bfloat16 if cuda else torch.float32
    )
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    begins: list[float] = []
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(tmp / "hf"),
        per_device_train_batch_size=a.batch,
        max_steps=a.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        logging_steps=10**6,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=42,
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    Trainer(
        model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Clock()]
    ).train()
    # Steps between callbacks (data loading, collation) are part of the loop: measure the loop
    # as a whole -- the sum of step times would flatter the baseline.
    w = a.warmup
    return a.batch * mean_len * (len(ends) - w) / (ends[-1] - begins[w])


def mfu(tps: float, trainer, seq: int) -> dict[str, float]:
    """Model FLOPs utilisation (PaLM convention, 6N + attention) and the LoRA hardware share (4N)."""
    model = trainer.model
    cfg = model.config
    n = sum(
        p.numel()
        for n_, p in model.named_parameters()
        if "embed_tokens" not in n_ and "lora_" not in n_
    )
    if getattr(cfg, "tie_word_embeddings", False):
        n += cfg.vocab_size * cfg.hidden_size  # the tied head still does its matmul
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq
    return {
        "params": n,
        "mfu_6N": tps * (6 * n + attn) / H100_BF16_PEAK,
        "hfu_4N": tps * (4 * n + attn) / H100_BF16_PEAK,
    }


def append_results(r: dict, seconds: float) -> None:
    """Append a section to bench/RESULTS.md."""
    m = r["meta"]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"\n## trainer_throughput ({when})\n",
        f"machine: {m['device']}, torch {m['torch']}; model {m['model']} (random init), LoRA r16 all-linear, "
        f"batch {m['batch']}, maxSeqLength {m['seq']}, {m['steps']} steps; took {seconds:.0f}s; "
        f"command: `python {m['command']}`\n",
        "| section | ours | baseline (transformers.Trainer + peft, DataCollatorForSeq2Seq) | ratio |",
        "|---|---|---|---|",
    ]
    if "uniform" in r:
        u = r["uniform"]
        lines.append(
            f"| tokens/s, code-word task (uniform lengths, no packing) | {u['ours_tps']:,.0f} | {u['baseline_tps']:,.0f} | {u['ratio']:.2f}x |"
        )
    if "varlen" in r:
        v = r["varlen"]
        lines.append(
            f"| tokens/s, variable-length text, ours packed | {v['ours_packed_tps']:,.0f} | {v['baseline_tps']:,.0f} | {v['ratio_packed']:.2f}x |"
        )
        lines.append(
            f"| tokens/s, variable-length text, ours padded | {v['ours_padded_tps']:,.0f} | {v['baseline_tps']:,.0f} | {v['ratio_padded']:.2f}x |"
        )
        if "mask" in v:
            k = v["mask"]
            lines.append(
                f"| forward+backward of 4 packed micro-batches: block-diagonal mask vs the plain mask packing used before (leaks across examples), alternated | {k['block_s'] * 1000:.0f} ms | {k['plain_s'] * 1000:.0f} ms | {k['ratio']:.2f}x |"
            )
        if "mfu_6N" in v:
            lines.append(
                f"| MFU (6N + attention, {v['params'] / 1e6:.0f}M params), packed | {v['mfu_6N']:.1%} | | |"
            )
            lines.append(
                f"| LoRA hardware FLOPs utilisation (4N + attention) | {v['hfu_4N']:.1%} | | |"
            )
    if "checkpoint" in r:
        c = r["checkpoint"]
        lines.append(
            f"| step time with a checkpoint every {c['every']} steps vs none | {c['step_s_ckpt'] * 1000:.1f} ms | "
            f"{c['step_s_plain'] * 1000:.1f} ms (no checkpoints) | {c['ratio']:.3f}x |"
        )
        if "ratio_from_stall" in c:
            lines.append(
                f"| expected step-time ratio from the measured stall (1 + stall / ({c['every']} x step)) | | | {c['ratio_from_stall']:.4f}x |"
            )
        lines.append(
            f"| per checkpoint ({c['ckpt_mb']:.2f} MB): loop stall / background upload | {c['stall_s_per_ckpt'] * 1000:.0f} ms | "
            f"{c['upload_s_per_ckpt_background'] * 1000:.0f} ms (hidden) | |"
        )
    if "resume" in r:
        x = r["resume"]
        lines.append(
            f"| start-up, resumed from step {x['resumed_from']} (find + verify + restore) vs fresh | {x['setup_resumed_s']:.2f} s | "
            f"{x['setup_fresh_s']:.2f} s | {x['setup_resumed_s'] / x['setup_fresh_s']:.2f}x |"
        )
        lines.append(
            f"| of which restoring weights/optimizer/RNG | {x['restore_s'] * 1000:.0f} ms | | |"
        )
    with (REPO / "bench/RESULTS.md").open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small", choices=["tiny", "small", "qwen0.5b"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--sections", default="uniform,varlen,checkpoint,resume")
    p.add_argument("--append", action="store_true")
    p.add_argument("--json", default="")
    a = p.parse_args()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from kubetune_trainer import synthetic

    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="kt-bench-"))
    base = build_model(a.model, tmp / "base")
    results: dict[str, dict] = {}
    sections = a.sections.split(",")
    if "uniform" in sections:
        train = synthetic.write_task_dataset(tmp / "task.jsonl", a.batch * (a.steps + 5), seed=1)
        ours, tr = run_ours(base, train, tmp, a, "uniform")
        hf = run_baseline(base, tr, a, tmp)
        results["uniform"] = {"ours_tps": ours, "baseline_tps": hf, "ratio": ours / hf}
        print(
            f"uniform: ours {ours:,.0f} tok/s vs Trainer+peft {hf:,.0f} tok/s = {ours / hf:.2f}x",
            flush=True,
        )
    if "varlen" in sections:
        train = varlen_dataset(
            tmp / "varlen.jsonl", a.batch * (a.steps + 5), max_words=int(a.seq * 0.9)
        )
        ours_p, tr = run_ours(base, train, tmp, a, "varlen-packed", packing=True)
        ours_np, tr_np = run_ours(base, train, tmp, a, "varlen-padded")
        hf = run_baseline(base, tr_np, a, tmp)
        results["varlen"] = {
            "ours_packed_tps": ours_p,
            "ours_padded_tps": ours_np,
            "baseline_tps": hf,
            "ratio_packed": ours_p / hf,
            "ratio_padded": ours_np / hf,
        }
        results["varlen"]["mask"] = mask_cost(tr)
        k = results["varlen"]["mask"]
        print(
            f"varlen mask cost: block-diagonal {k['block_s'] * 1000:.0f} ms vs plain (leaky) "
            f"{k['plain_s'] * 1000:.0f} ms = {k['ratio']:.2f}x",
            flush=True,
        )
        if a.device == "cuda":
            results["varlen"].update(mfu(ours_p, tr, a.seq))
        print(
            f"varlen: ours packed {ours_p:,.0f} / padded {ours_np:,.0f} tok/s vs Trainer+peft {hf:,.0f} tok/s = "
            f"{ours_p / hf:.2f}x (packed), {ours_np / hf:.2f}x (padded)",
            flush=True,
        )
        if a.device == "cuda":
            m = results["varlen"]
            print(
                f"varlen MFU (6N+attn, {m['params'] / 1e6:.0f}M params): {m['mfu_6N']:.1%}; LoRA hardware FLOPs (4N): {m['hfu_4N']:.1%}"
            )
    if "checkpoint" in sections:
        train = synthetic.write_task_dataset(tmp / "ck.jsonl", a.batch * (a.steps + 5), seed=3)
        every = 5
        _, plain = run_ours(base, train, tmp, a, "ck-none")
        _, ck = run_ours(base, train, tmp, a, "ck-every", ckpt_every=every)
        w = a.warmup
        t_plain = statistics.fmean(plain.step_times[w:])
        # Step time with checkpoints = (loop time incl. the synchronous part of each save) / steps.
        t_ck = (sum(ck.step_times[w:]) + sum(ck.checkpoint_stall[1:])) / len(ck.step_times[w:])
        upload = (
            statistics.fmean(ck.checkpoints.upload_seconds)
            if ck.checkpoints.upload_seconds
            else 0.0
        )
        stall = statistics.fmean(ck.checkpoint_stall)
        # Under a noisy shared CPU the two runs' step times differ by more than the stall itself;
        # the stall per checkpoint (measured around the save call) gives the expected ratio.
        expected = 1 + statistics.fmean(ck.checkpoint_stall) / (every * t_plain)
        results["checkpoint"] = {
            "ratio_from_stall": expected,
            "every": every,
            "step_s_plain": t_plain,
            "step_s_ckpt": t_ck,
            "ratio": t_ck / t_plain,
            "stall_s_per_ckpt": stall,
            "upload_s_per_ckpt_background": upload,
            "ckpt_mb": sum(
                f.stat().st_size
                for f in (tmp / "ck-every-out/checkpoints").rglob("*")
                if f.is_file()
            )
            / 2
            / 1e6,
        }
        print(
            f"checkpoint every {every} steps: step time {t_ck * 1000:.1f} ms vs {t_plain * 1000:.1f} ms = {t_ck / t_plain:.3f}x "
            f"(stall {stall * 1000:.1f} ms per checkpoint; upload {upload * 1000:.1f} ms in the background)",
            flush=True,
        )
    if "resume" in sections:
        from kubetune_trainer.train import Trainer

        train = synthetic.write_task_dataset(tmp / "rs.jsonl", a.batch * (a.steps + 5), seed=4)
        out, work = tmp / "rs-out", tmp / "rs-work"
        s = make_settings(base, train, out, work, a, ckpt_every=10)
        Trainer(s).run()
        shutil.rmtree(out / "model")
        fresh_settings = make_settings(base, train, tmp / "rs-fresh", tmp / "rs-fresh-work", a)
        Trainer(
            fresh_settings
        ).setup()  # validates the data once, as the resumed run's first attempt did
        t0 = time.perf_counter()
        fresh = Trainer(fresh_settings)
        fresh.setup()
        t_fresh = time.perf_counter() - t0
        t0 = time.perf_counter()
        resumed = Trainer(s)
        resumed.setup()
        t_resume = time.perf_counter() - t0
        results["resume"] = {
            "setup_fresh_s": t_fresh,
            "setup_resumed_s": t_resume,
            "restore_s": resumed.resume_seconds,
            "resumed_from": resumed.resumed_from,
        }
        print(
            f"resume from step {resumed.resumed_from}: setup {t_resume:.2f}s vs fresh {t_fresh:.2f}s "
            f"(restore {resumed.resume_seconds * 1000:.0f} ms after verification)",
            flush=True,
        )
    device = (
        torch.cuda.get_device_name()
        if a.device == "cuda"
        else f"{platform.processor() or platform.machine()} x{os.cpu_count()} (torch threads {torch.get_num_threads()})"
    )
    results["meta"] = {
        "model": a.model,
        "device": device,
        "steps": a.steps,
        "batch": a.batch,
        "seq": a.seq,
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    print(json.dumps(results, indent=2, default=float))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=float))
    if a.append:
        append_results(results, time.time() - started)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
