"""Sharded training (FSDP2, distributed.strategy fsdp) and activation checkpointing on the tiny
Llama model, on CPU with gloo, under ``torchrun --nproc-per-node=2``.

Covers: full fine-tuning sharded over 2 processes matches the unsharded run (eval loss and every
weight within PARITY_ATOL after 8 steps) and writes one DCP shard per process under one
manifest; SIGKILL of the whole pod (torchrun and both workers) mid-run, then a restart, resumes
from the newest complete checkpoint and ends bit-for-bit where the uninterrupted sharded run
ends; SIGTERM to torchrun makes both workers checkpoint the same step (every shard, one
manifest) and exit as preempted; through S3, a new pod downloads the newest sharded checkpoint
once (its first process; the other shares it) and continues bit for bit; a checkpoint of 2
processes resumes on 1 and one of 1 resumes on 2 (to PARITY_ATOL of the uninterrupted run: the
reduction order changes with the layout); LoRA sharded over 2 processes matches unsharded LoRA;
early stopping under fsdp publishes the best sharded checkpoint, loaded back into the shards; a
ddp checkpoint is refused by name under fsdp; gradient checkpointing changes memory, not results
(same adapter with dropout on).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetune.storage import open_store
from kubetune.storage.manifests import verify_prefix
from kubetune_trainer import synthetic
from tests.integration.trainer_helpers import load_weights, make_spec, run, run_here, trainer_env

# Sharded and unsharded runs add the same numbers in another order (a reduce-scatter over 2
# ranks instead of one sum): after 8 AdamW steps at lr 1e-3 the weights differ by ~5e-7.
PARITY_ATOL = 1e-5
STEPS = 8


def torchrun(env: dict[str, str], nproc: int = 2) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node=N -m kubetune_trainer train``."""
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    return subprocess.Popen(
        [exe, "--standalone", f"--nproc-per-node={nproc}", "-m", "kubetune_trainer", "train"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, env: dict[str, str]) -> tuple[dict, str]:
    """Wait for a run; returns (rank 0's termination message, stderr)."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return json.loads(Path(env["KUBETUNE_TERMINATION_LOG"]).read_text()), err


def full_spec(base_uri: str, train: Path, out: Path, **over) -> dict:
    return make_spec(
        base_uri,
        train.as_uri(),
        out.as_uri(),
        method={"type": "full"},  # distributed.strategy auto: fsdp
        dataset={"train": train.as_uri(), "maxSeqLength": 128},
        hyperparameters={"maxSteps": STEPS, "batchSize": 8, "learningRate": 1e-3},
        evaluation={"everySteps": 4},
        checkpoint={"everySteps": 2, "keepLast": 4, "keepBest": False},
        **over,
    )


def per_process(spec: dict, nproc: int) -> dict:
    """The same global batch on ``nproc`` processes (batchSize is per process)."""
    hp = dict(spec["hyperparameters"])
    hp["batchSize"] = 8 // nproc
    return {**spec, "hyperparameters": hp}


def assert_close(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


@pytest.fixture(scope="module")
def sharded_reference(tmp_path_factory, tiny_base_model_uri):
    """One uninterrupted full fine-tuning run sharded over 2 processes (8 steps)."""
    tmp = tmp_path_factory.mktemp("fsdp-reference")
    train = synthetic.write_task_dataset(tmp / "train.jsonl", 80, format="text")
    spec = per_process(full_spec(tiny_base_model_uri, train, tmp / "out"), 2)
    env = trainer_env(spec, tmp)
    msg, err = finish(torchrun(env), env)
    return {"dir": tmp, "train": train, "spec": spec, "env": env, "msg": msg, "err": err}


@pytest.fixture
def one_thread():
    """In-process training on one thread (two shared cores; see trainer_helpers.trainer_env)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gradient_checkpointing_gives_the_same_adapter_with_dropout_on(
    tmp_path, tiny_base_model_uri, monkeypatch, one_thread
):
    import torch

    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 40)
    published = {}
    for flag in (False, True):
        out = tmp_path / f"out-{flag}"
        spec = make_spec(
            tiny_base_model_uri,
            train.as_uri(),
            out.as_uri(),
            # Dropout on: the recomputed forward must draw the same masks as the first one.
            method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
            hyperparameters={"maxSteps": 3, "batchSize": 4, "gradientCheckpointing": flag},
            evaluation={"everySteps": 100},
            checkpoint={"everySteps": 100},
        )
        code, msg = run_here("train", trainer_env(spec, tmp_path / f"run-{flag}"), monkeypatch)
        assert code == 0, msg
        assert json.loads((out / "model/lineage.json").read_text())["gradientCheckpointing"] is flag
        published[flag] = load_weights(Path(out / "model"))
    assert published[True].keys() == published[False].keys()
    for name, tensor in published[False].items():
        assert torch.equal(tensor, published[True][name]), name


@pytest.mark.slow
def test_full_finetuning_on_two_processes_matches_the_unsharded_run(
    sharded_reference, tiny_base_model_uri, tmp_path
):
    ref = sharded_reference
    out = ref["dir"] / "out"
    # Unsharded: one process, distributed.strategy ddp (no process group at all).
    spec = full_spec(
        tiny_base_model_uri, ref["train"], tmp_path / "out", distributed={"strategy": "ddp"}
    )
    code, alone, err = run("train", trainer_env(spec, tmp_path), timeout=600)
    assert code == 0, err
    assert abs(alone["metrics"]["evalLoss"] - ref["msg"]["metrics"]["evalLoss"]) <= PARITY_ATOL
    assert abs(alone["metrics"]["trainLoss"] - ref["msg"]["metrics"]["trainLoss"]) <= PARITY_ATOL
    assert_close(load_weights(tmp_path / "out/model"), load_weights(out / "model"), PARITY_ATOL)
    lineage = json.loads((out / "model/lineage.json").read_text())
    assert lineage["strategy"] == "fsdp" and lineage["worldSize"] == 2
    assert ref["err"].count("fsdp: 2 decoder layers sharded over 2 processes") == 2
    # Every process wrote its own shard; rank 0 the DCP metadata and the manifest, last.
    manifest = verify_prefix(open_store(out.as_uri()), "checkpoints/step-4")
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng.pt", "scheduler.pt"} <= {
        f["path"] for f in manifest["files"]
    }
    assert not (out / "checkpoints/step-4/weights.safetensors").exists()


@pytest.mark.slow
def test_sigkill_of_the_pod_then_restart_continues_bit_for_bit(sharded_reference, tmp_path):
    ref = sharded_reference
    out = tmp_path / "out"
    spec = {**ref["spec"], "output": {"uri": out.as_uri()}}
    env = trainer_env(spec, tmp_path)
    victim = torchrun(env)
    deadline = time.monotonic() + 300
    while (
        not (out / "checkpoints/step-4/manifest.json").exists()
        and victim.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    # The pod is lost: torchrun and both workers at once (torchrun starts each worker in its
    # own session, so the group of torchrun alone would not reach them).
    for pid in [victim.pid, *descendants(victim.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    victim.communicate()
    assert not (out / "model").exists(), "the run ended before it could be killed"
    msg, err = finish(torchrun(env), env)
    resumed = json.loads((out / "model/lineage.json").read_text())["resumedFromStep"]
    assert 4 <= resumed < STEPS and f"resumed from step {resumed}" in msg["message"]
    assert msg["metrics"] == ref["msg"]["metrics"]
    a, b = load_weights(ref["dir"] / "out/model"), load_weights(out / "model")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: each process' parent id)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ')'.
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def _only_checkpoint(src: Path, step: int, dst: Path) -> None:
    """A fresh output folder holding one checkpoint (and the validated data) of another run."""
    shutil.copytree(src / f"checkpoints/step-{step}", dst / f"checkpoints/step-{step}")
    shutil.copytree(src / "data", dst / "data")


@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_on_one_and_back_on_two(sharded_reference, tmp_path):
    ref = sharded_reference
    final = load_weights(ref["dir"] / "out/model")
    # 2 -> 1: the 2-process checkpoint of step 4 resumes in a single process.
    one = tmp_path / "one"
    _only_checkpoint(ref["dir"] / "out", 4, one / "out")
    spec = per_process({**ref["spec"], "output": {"uri": (one / "out").as_uri()}}, 1)
    code, msg, err = run("train", trainer_env(spec, one), timeout=600)
    assert code == 0, err
    assert "resumed from step 4" in msg["message"] and "re-seeded" in err
    assert_close(load_weights(one / "out/model"), final, PARITY_ATOL)
    assert abs(msg["metrics"]["evalLoss"] - ref["msg"]["metrics"]["evalLoss"]) <= PARITY_ATOL
    shards = {
        f["path"]
        for f in verify_prefix(open_store((one / "out").as_uri()), "checkpoints/step-6")["files"]
    }
    assert "__0_0.distcp" in shards and "__1_0.distcp" not in shards
    # 1 -> 2: that single process' checkpoint of step 6 resumes on two.
    two = tmp_path / "two"
    _only_checkpoint(one / "out", 6, two / "out")
    spec = {**ref["spec"], "output": {"uri": (two / "out").as_uri()}}
    env = trainer_env(spec, two)
    msg, err = finish(torchrun(env), env)
    assert "resumed from step 6" in msg["message"]
    assert_close(load_weights(two / "out/model"), final, PARITY_ATOL)


@pytest.mark.slow
def test_lora_sharded_over_two_processes_matches_unsharded_lora(tmp_path, tiny_base_model_uri):
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 60)
    results = {}
    for name, nproc, strategy in (("alone", 1, "ddp"), ("sharded", 2, "fsdp")):
        d = tmp_path / name
        spec = make_spec(
            tiny_base_model_uri,
            train.as_uri(),
            (d / "out").as_uri(),
            method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
            distributed={"strategy": strategy},
            hyperparameters={"maxSteps": 4, "batchSize": 8 // nproc},
            evaluation={"everySteps": 4},
            checkpoint={"everySteps": 2},
        )
        env = trainer_env(spec, d)
        if nproc == 1:
            code, msg, err = run("train", env, timeout=600)
            assert code == 0, err
        else:
            msg, err = finish(torchrun(env), env)
        results[name] = (msg, load_weights(d / "out/model"))
    (alone, a), (sharded, b) = results["alone"], results["sharded"]
    # Only the adapter is published (and checkpointed): the frozen base is the base model.
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    assert_close(a, b, PARITY_ATOL)
    assert abs(alone["metrics"]["evalLoss"] - sharded["metrics"]["evalLoss"]) <= PARITY_ATOL
    assert alone["metrics"]["evalAccuracy"] == sharded["metrics"]["evalAccuracy"]


def test_a_ddp_checkpoint_is_refused_by_name_under_fsdp(
    tmp_path, tiny_base_model_uri, monkeypatch, one_thread
):
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 40, format="text")
    out = tmp_path / "out"
    over = {"hyperparameters": {"maxSteps": 2, "batchSize": 4}, "checkpoint": {"everySteps": 1}}
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        out.as_uri(),
        method={"type": "full"},
        distributed={"strategy": "ddp"},
        **over,
    )
    code, msg = run_here("train", trainer_env(spec, tmp_path / "ddp"), monkeypatch)
    assert code == 0, msg
    spec = {
        **spec,
        "distributed": {"strategy": "fsdp"},
        "hyperparameters": {"maxSteps": 3, "batchSize": 4},
    }
    code, msg = run_here("train", trainer_env(spec, tmp_path / "fsdp"), monkeypatch)
    assert code == 2 and msg["outcome"] == "config_error"
    assert "written with distributed.strategy ddp" in msg["message"]
    assert "set distributed.strategy: ddp" in msg["message"]


def test_sharded_early_stopping_publishes_the_best_sharded_checkpoint(
    tmp_path, tiny_base_model_uri, monkeypatch, one_thread
):
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 60)
    out = tmp_path / "out"
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        out.as_uri(),
        distributed={"strategy": "fsdp"},  # LoRA sharded, one process (a group of one)
        # As in test_trainer_train: the high learning rate overshoots, eval loss rises, early
        # stopping ends the run and keepBest loads the best sharded checkpoint back to publish.
        hyperparameters={"maxSteps": 100, "learningRate": 0.5, "maxGradNorm": 0.0},
        evaluation={"everySteps": 2, "earlyStopping": {"patience": 2}},
        checkpoint={"everySteps": 2, "keepLast": 1, "keepBest": True},
    )
    code, msg = run_here("train", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 0 and "early stopping" in msg["message"], msg
    lineage = json.loads((out / "model/lineage.json").read_text())
    best = lineage["best"]["step"]
    assert lineage["strategy"] == "fsdp" and lineage["publishedStep"] == best < msg["step"]
    dcp_to_torch_save(out / f"checkpoints/step-{best}", tmp_path / "best.pt")
    kept = torch.load(tmp_path / "best.pt", weights_only=False)["model"]
    published = load_weights(out / "model")
    assert len(published) == len(kept) > 0
    for name, tensor in published.items():
        assert torch.equal(tensor, kept[name.removesuffix(".weight") + ".default.weight"]), name


@pytest.mark.slow
def test_sigterm_to_torchrun_checkpoints_every_shard_and_exits_143(tmp_path, tiny_base_model_uri):
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 60, format="text")
    out = tmp_path / "out"
    spec = per_process(full_spec(tiny_base_model_uri, train, out), 2)
    spec["hyperparameters"]["maxSteps"] = 100000
    spec["checkpoint"] = {"everySteps": 100000}
    spec["evaluation"] = {"everySteps": 100000}
    env = trainer_env(spec, tmp_path)
    progress = tmp_path / "progress.json"
    proc = torchrun(env)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(progress.read_text()).get("progress", {}).get("step", 0) >= 2:
                break
        time.sleep(0.02)
    # The kubelet's part: SIGTERM to the container's first process, torchrun, which passes it
    # on to its workers; they agree on a step, checkpoint it together and exit 143.
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    msg = json.loads(Path(env["KUBETUNE_TERMINATION_LOG"]).read_text())
    assert msg["outcome"] == "preempted" and msg["step"] >= 2, err[-3000:]
    manifest = verify_prefix(open_store(out.as_uri()), f"checkpoints/step-{msg['step']}")
    paths = {f["path"] for f in manifest["files"]}
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.json"} <= paths
    assert err.count("SIGTERM at step") >= 1


@pytest.mark.slow
def test_sharded_checkpoints_through_s3_resume_in_a_new_pod_bit_for_bit(
    tmp_path, tiny_base_model, s3_env, s3_uri
):
    store = open_store(s3_uri)
    store.upload_dir(tiny_base_model, "base")
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 60, format="text")
    store.upload_file(train, "in/train.jsonl")
    spec = make_spec(
        f"{s3_uri}/base",
        f"{s3_uri}/in/train.jsonl",
        f"{s3_uri}/out",
        method={"type": "full"},
        dataset={"train": f"{s3_uri}/in/train.jsonl", "maxSeqLength": 128},
        hyperparameters={"maxSteps": 4, "batchSize": 4, "learningRate": 1e-3},
        evaluation={"everySteps": 4},
        checkpoint={"everySteps": 2, "keepLast": 2, "keepBest": False},
    )
    first = trainer_env(spec, tmp_path / "first", s3_env)
    finish(torchrun(first), first)
    store.download_dir("out/model", tmp_path / "straight")
    # A new pod (empty work folder) after the artifact is gone: the newest checkpoint (step 2)
    # comes down from S3 once for the pod, both processes load their shards from it.
    store.delete_prefix("out/model/")
    second = trainer_env(spec, tmp_path / "second", s3_env)
    msg, err = finish(torchrun(second), second)
    assert "resumed from step 2" in msg["message"]
    assert (tmp_path / "second/work/resume/step-2/manifest.json").exists()
    assert not any((tmp_path / "second/work" / f"rank-{r}" / "resume").exists() for r in (0, 1))
    store.download_dir("out/model", tmp_path / "resumed")
    a, b = load_weights(tmp_path / "straight"), load_weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
