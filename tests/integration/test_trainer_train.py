"""``python -m kubetune_trainer train`` on the tiny Llama model (CPU).

Covers: LoRA training lowers eval loss and lifts exact-match accuracy far above the base model
(measured on the held-out split, through the published adapter and the merged model); the
artifact's manifest verifies and lineage names base model, data, spec and metrics; SIGKILL mid-run
then restart resumes from the newest checkpoint that verifies -- skipping a half-written one (no
manifest) and a corrupted one -- and ends bit-for-bit where an uninterrupted run ends; SIGTERM
writes a verifiable checkpoint and exits 143; a run through S3 with 10% of requests answered 503
succeeds with every checkpoint intact; full fine-tuning with packing; early stopping; QLoRA
without a GPU is a clear config error.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from kubetune.storage import open_store
from kubetune.storage.manifests import verify_dir, verify_prefix
from kubetune_trainer import synthetic
from tests.integration.trainer_helpers import (
    load_weights,
    make_spec,
    run,
    run_here,
    start,
    trainer_env,
)


@pytest.fixture
def one_thread():
    """In-process training on one thread (two shared cores; see trainer_helpers.trainer_env)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _val_examples(out: Path) -> list[dict[str, str]]:
    return synthetic.read_task_examples(out / "data/validation.jsonl")


@pytest.mark.slow
def test_lora_lowers_eval_loss_and_lifts_exact_match(
    tmp_path, tiny_base_model, tiny_base_model_uri, monkeypatch, one_thread
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 400, seed=1)
    out = tmp_path / "out"
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        out.as_uri(),
        dataset={"train": train.as_uri(), "validationSplit": 0.1},
        hyperparameters={"maxSteps": 160, "batchSize": 16},
        evaluation={"everySteps": 40},
        checkpoint={"everySteps": 40, "keepLast": 1, "keepBest": True},
        output={"uri": out.as_uri(), "mergeAdapter": True},
    )
    code, msg = run_here("train", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 0, msg
    lineage = json.loads((out / "model/lineage.json").read_text())
    evals = [
        e
        for e in json.loads((out / "checkpoints/step-120/trainer_state.json").read_text())["train"][
            "evals"
        ]
    ]
    first_loss = evals[0]["evalLoss"]
    final = msg["metrics"]
    # Measured, not assumed: the base model's accuracy on the same held-out examples.
    tok = AutoTokenizer.from_pretrained(tiny_base_model)
    examples = _val_examples(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_base_model)
    base_acc = synthetic.exact_match(
        lambda p: synthetic.generate_with_model(base, tok, p), examples
    )
    tuned = PeftModel.from_pretrained(base, out / "model").eval()
    tuned_acc = synthetic.exact_match(
        lambda p: synthetic.generate_with_model(tuned, tok, p), examples
    )
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    merged_acc = synthetic.exact_match(
        lambda p: synthetic.generate_with_model(merged, tok, p), examples
    )
    print(
        f"base {base_acc:.2f} -> tuned {tuned_acc:.2f} (trainer: {final['evalAccuracy']}), eval loss {first_loss} -> {final['evalLoss']}"
    )
    assert base_acc <= 0.1
    assert tuned_acc >= 0.6 and final["evalAccuracy"] >= 0.6 and merged_acc == tuned_acc
    assert final["evalLoss"] < first_loss / 2 and final["bestEvalLoss"] == final["evalLoss"]
    # Artifact: manifest verifies, digest reported, lineage complete.
    manifest = verify_dir(out / "model")
    assert {f["path"] for f in manifest["files"]} >= {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "lineage.json",
    }
    assert (
        msg["artifact"]["digest"].startswith("sha256:")
        and msg["artifact"]["mergedUri"] == (out / "merged").as_uri()
    )
    verify_dir(out / "merged")
    assert lineage["baseModel"]["uri"] == tiny_base_model_uri and lineage["baseModel"][
        "digest"
    ].startswith("sha256:")
    assert (
        lineage["dataset"]["digest"] == msg["dataReport"]["digest"]
        and lineage["spec"]["hyperparameters"]["maxSteps"] == 160
    )
    assert lineage["step"] == 160 and lineage["metrics"]["evalLoss"] == final["evalLoss"]
    assert (
        json.loads((out / "model/adapter_config.json").read_text())["base_model_name_or_path"]
        == tiny_base_model_uri
    )
    # Retention: keepLast 1 (step 120; the final step publishes instead) plus the best, which is also 120.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-120"]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["progress"]["step"] == 160 and progress["progress"]["percent"] == 100
    assert (
        progress["progress"]["tokensPerSecond"] > 0 and progress["checkpoints"][-1]["step"] == 120
    )
    assert torch.get_num_threads() == 1


def _complete_steps(out: Path) -> list[int]:
    ckpts = out / "checkpoints"
    if not ckpts.exists():
        return []
    return sorted(int(p.name[5:]) for p in ckpts.iterdir() if (p / "manifest.json").exists())


@pytest.mark.slow
def test_sigkill_then_restart_resumes_exactly_skipping_partial_and_corrupted(
    tmp_path, tiny_base_model_uri
):
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 120, seed=2)
    runs = {}
    for name in ("straight", "killed"):
        d = tmp_path / name
        d.mkdir()
        spec = make_spec(
            tiny_base_model_uri,
            train.as_uri(),
            (d / "out").as_uri(),
            method={
                "type": "lora",
                "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
            },  # dropout: RNG must resume too
            hyperparameters={
                "maxSteps": 60,
                "batchSize": 8,
                "gradientAccumulationSteps": 2,
                "scheduler": "cosine",
                "warmupRatio": 0.1,
            },
            checkpoint={"everySteps": 5, "keepLast": 3, "keepBest": False},
        )
        runs[name] = (d, trainer_env(spec, d))
    straight = start("train", runs["straight"][1])
    killed_dir, killed_env = runs["killed"]
    victim = start("train", killed_env)
    deadline = time.monotonic() + 120
    while (
        len(_complete_steps(killed_dir / "out")) < 3
        and victim.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    steps = _complete_steps(killed_dir / "out")
    assert len(steps) >= 2 and steps[-1] < 60
    ckpts = killed_dir / "out/checkpoints"
    # A half-written newer checkpoint (no manifest) and a corrupted newest complete one.
    partial = ckpts / f"step-{steps[-1] + 1}"
    partial.mkdir(exist_ok=True)
    (partial / "weights.safetensors").write_bytes(b"half")
    weights = ckpts / f"step-{steps[-1]}/weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    code, resumed, err = run("train", killed_env)
    assert code == 0, err
    s_out, s_err = straight.communicate(timeout=180)
    assert straight.returncode == 0, s_err
    lineage = json.loads((killed_dir / "out/model/lineage.json").read_text())
    assert lineage["resumedFromStep"] == steps[-2]
    assert "does not verify" in err and "no manifest.json" in err
    straight_msg = json.loads(Path(runs["straight"][1]["KUBETUNE_TERMINATION_LOG"]).read_text())
    assert resumed["step"] == straight_msg["step"] == 60
    assert resumed["metrics"] == straight_msg["metrics"]
    a = load_weights(runs["straight"][0] / "out/model")
    b = load_weights(killed_dir / "out/model")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    progress = json.loads((killed_dir / "progress.json").read_text())
    assert progress["resumedFromStep"] == steps[-2]


def test_sigterm_writes_a_verifiable_checkpoint_and_exits_143(
    tmp_path, tiny_base_model_uri, monkeypatch, one_thread
):
    import os
    import threading

    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 60)
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        (tmp_path / "out").as_uri(),
        hyperparameters={"maxSteps": 100000},
        checkpoint={"everySteps": 100000},
        evaluation={"everySteps": 100000},
    )
    env = trainer_env(spec, tmp_path)
    progress = tmp_path / "progress.json"
    done = threading.Event()

    def kubelet() -> None:
        # The kubelet's part: SIGTERM once training is under way (the trainer runs in this
        # process, so the signal reaches the handler it installed in the main thread).
        while not done.is_set():
            if (
                progress.exists()
                and json.loads(progress.read_text()).get("progress", {}).get("step", 0) >= 3
            ):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=kubelet, daemon=True)
    thread.start()
    try:
        code, msg = run_here("train", env, monkeypatch)
    finally:
        done.set()
    assert code == 143, msg
    assert msg["outcome"] == "preempted" and msg["step"] >= 3
    folder = tmp_path / f"out/checkpoints/step-{msg['step']}"
    manifest = verify_dir(folder)
    assert manifest["step"] == msg["step"] and f"step-{msg['step']}" in msg["message"]
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["dataPosition"]["microBatch"] == msg["step"]
    assert signal.getsignal(signal.SIGTERM) is not None  # the handler was given back


@pytest.mark.slow
def test_s3_with_503s_succeeds_with_every_checkpoint_intact(
    tmp_path, tiny_base_model, s3_env, s3_uri, fault_proxy, monkeypatch, one_thread
):
    store = open_store(s3_uri)
    store.upload_dir(tiny_base_model, "base")
    synthetic.write_task_dataset(tmp_path / "train.jsonl", 60)
    store.upload_file(tmp_path / "train.jsonl", "in/train.jsonl")
    proxy = fault_proxy(error_rate=0.1, seed=3)
    spec = make_spec(
        f"{s3_uri}/base",
        f"{s3_uri}/in/train.jsonl",
        f"{s3_uri}/out",
        hyperparameters={"maxSteps": 12},
        checkpoint={"everySteps": 3, "keepLast": 10},
        evaluation={"everySteps": 6},
    )
    env = trainer_env(spec, tmp_path, {**s3_env, "AWS_ENDPOINT_URL": proxy.endpoint})
    code, msg = run_here("train", env, monkeypatch)
    assert code == 0, msg
    assert proxy.faults > 0
    for step in (3, 6, 9):
        assert verify_prefix(store, f"out/checkpoints/step-{step}")["step"] == step
    manifest = verify_prefix(store, "out/model")
    from kubetune.storage.manifests import manifest_digest

    assert msg["artifact"] == {
        "uri": f"{s3_uri}/out/model",
        "digest": manifest_digest(manifest),
        "lineageUri": f"{s3_uri}/out/model/lineage.json",
    }


def test_full_finetuning_with_packing_publishes_full_weights(
    tmp_path, tiny_base_model_uri, monkeypatch, one_thread
):
    from transformers import AutoModelForCausalLM

    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 80, format="text")
    out = tmp_path / "out"
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        out.as_uri(),
        method={"type": "full"},
        dataset={"train": train.as_uri(), "packing": True, "maxSeqLength": 128},
        hyperparameters={"maxSteps": 4, "learningRate": 1e-3, "weightDecay": 0.01},
        checkpoint={"everySteps": 2},
    )
    code, msg = run_here("train", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 0, msg
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2
    assert json.loads((out / "model/lineage.json").read_text())["artifactType"] == "model"
    assert "evalAccuracy" in msg["metrics"]  # text format: answers after the marker are scored


def test_early_stopping_ends_the_run_and_publishes_the_best_checkpoint(
    tmp_path, tiny_base_model_uri, monkeypatch, one_thread
):
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 60)
    out = tmp_path / "out"
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        out.as_uri(),
        # A high learning rate overshoots after the first steps: eval loss rises, early stopping
        # ends the run and keepBest publishes the checkpoint with the lowest eval loss.
        hyperparameters={"maxSteps": 100, "learningRate": 0.5, "maxGradNorm": 0.0},
        evaluation={"everySteps": 2, "earlyStopping": {"patience": 2}},
        checkpoint={"everySteps": 2, "keepLast": 1, "keepBest": True},
    )
    code, msg = run_here("train", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 0 and "early stopping" in msg["message"], msg
    lineage = json.loads((out / "model/lineage.json").read_text())
    assert lineage["stoppedEarly"] is True and msg["step"] < 100
    best = lineage["best"]["step"]
    assert lineage["publishedStep"] == best < msg["step"]
    assert msg["metrics"]["bestEvalLoss"] < msg["metrics"]["evalLoss"]
    published = load_weights(out / "model")
    kept = load_weights(out / f"checkpoints/step-{best}")
    assert len(published) == len(kept) > 0
    assert all(
        (published[k] == kept[k.removesuffix(".weight") + ".default.weight"]).all()
        for k in published
    )


def test_qlora_without_a_gpu_is_a_config_error(tmp_path, tiny_base_model_uri, monkeypatch):
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 20)
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        (tmp_path / "out").as_uri(),
        method={"type": "qlora"},
        resources={"gpus": 1},
    )
    code, msg = run_here("train", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 2 and msg["outcome"] == "config_error"
    assert "qlora needs a CUDA GPU" in msg["message"] and "method.type lora" in msg["message"]


@pytest.mark.slow
def test_torchrun_two_processes_train_one_model_from_s3(tmp_path, tiny_base_model, s3_env, s3_uri):
    import shutil
    import subprocess
    import sys

    import torch

    store = open_store(s3_uri)
    store.upload_dir(tiny_base_model, "base")
    synthetic.write_task_dataset(tmp_path / "train.jsonl", 80)
    store.upload_file(tmp_path / "train.jsonl", "in/train.jsonl")
    spec = make_spec(
        f"{s3_uri}/base",
        f"{s3_uri}/in/train.jsonl",
        f"{s3_uri}/out",
        method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
        hyperparameters={"maxSteps": 6, "batchSize": 4, "gradientAccumulationSteps": 2},
        evaluation={"everySteps": 3},
        checkpoint={"everySteps": 3},
    )
    env = trainer_env(spec, tmp_path, s3_env)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node=2", "-m", "kubetune_trainer", "train"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    msg = json.loads(Path(env["KUBETUNE_TERMINATION_LOG"]).read_text())
    assert msg["outcome"] == "succeeded" and msg["step"] == 6  # rank 0 speaks for the pod
    assert store.read_json("out/model/lineage.json")["worldSize"] == 2
    # Both ranks hold the same weights after every step: their evaluations agree exactly.
    evals = [line for line in proc.stderr.splitlines() if "step 6 eval" in line]
    assert len(evals) == 2 and evals[0].split("eval: ")[1] == evals[1].split("eval: ")[1]
    verify_prefix(store, "out/checkpoints/step-3")
    store.download_file("out/checkpoints/step-3/rng.pt", tmp_path / "rng.pt")
    rng = torch.load(tmp_path / "rng.pt", weights_only=False)
    assert rng["worldSize"] == 2 and len(rng["ranks"]) == 2
    # The pod's processes shared one download of the base model.
    assert [p.name for p in (tmp_path / "work").iterdir() if p.name == "base-model"] == [
        "base-model"
    ]
    assert not any((tmp_path / "work" / f"rank-{r}" / "base-model").exists() for r in (0, 1))
