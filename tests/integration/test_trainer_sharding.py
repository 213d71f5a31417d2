"""Sharded training and activation checkpointing on the tiny Llama model (CPU, gloo).

Covers: gradient checkpointing changes memory, not results (same adapter with dropout on, the
lineage records it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer import synthetic
from tests.integration.trainer_helpers import load_weights, make_spec, run_here, trainer_env


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
