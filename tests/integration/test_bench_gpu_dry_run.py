"""bench/gpu/train_at_scale.py on CPU: what can be checked without a GPU.

Covers: ``--dry-run`` parses the arguments, builds the chosen shape's config (8B weights counted
as Llama 3.1 8B's), says which cases this machine could run, and trains one step of the tiny
model sharded (the trainer's own shard_model), with checkpointing, and unsharded, and prints the
memory estimate of each case; a bad
``--cases`` is refused by name; without a GPU the real run stops with a clear message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench/gpu/train_at_scale.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )


@pytest.mark.slow
def test_dry_run_builds_the_model_and_trains_one_sharded_step_on_cpu():
    proc = bench("--dry-run", "--size", "8b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "8b = 7.50B weights" in out
    for case in ("fsdp-bf16", "fsdp-bf16-ckpt", "unsharded-bf16"):
        assert f"{case} on the tiny model, CPU: one step" in out
    assert "qlora:" in out and "fsdp-bf16-flash:" in out and "trainer-fsdp: runnable" in out
    # The memory pre-flight's figures for the same runs: sharding and checkpointing each lower it.
    line = next(x for x in out.splitlines() if x.strip().startswith("estimates per GPU"))
    gib = {
        part.rsplit(" ", 2)[0].strip(): float(part.rsplit(" ", 2)[1])
        for part in line.split(": ", 1)[1].split(", ")
    }
    assert gib["unsharded-bf16"] > gib["fsdp-bf16"] > gib["fsdp-bf16-ckpt"], gib


def test_unknown_case_is_refused_by_name():
    proc = bench("--cases", "fsdp-bf16,fsdp-fp8")
    assert proc.returncode == 2 and "unknown ['fsdp-fp8']" in proc.stderr


def test_without_a_gpu_the_run_says_to_use_dry_run():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real run would start")
    proc = bench("--cases", "fsdp-bf16")
    assert proc.returncode == 2 and "use --dry-run on CPU" in proc.stderr
