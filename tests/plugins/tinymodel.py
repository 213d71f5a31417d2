"""Pytest plugin: a tiny base model and synthetic datasets (see kubetune_trainer.synthetic).

Fixtures:

- ``tiny_base_model`` (session): ``Path`` of an HF-format folder with a random-init 2-layer
  Llama (hidden 64) and a byte-level BPE tokenizer with a ChatML template. Built once per test
  session (about a second); treat it as read-only (copy it if a test must change it).
- ``tiny_base_model_uri`` (session): the same folder as a ``file://`` URI.
- ``make_task_dataset`` (function): factory ``(name="train.jsonl", n=200, seed=0,
  format="chat", variant="a") -> Path`` writing a JSONL dataset of the learnable code-word task
  under the test's ``tmp_path``.
- ``task_eval_examples`` (session): 48 held-out ``{"prompt", "answer"}`` examples of variant
  ``"a"`` (seed 999, never used for training data by the fixtures' defaults), for
  ``synthetic.exact_match``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_trainer import synthetic


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init Llama model + tokenizer folder, built once per session."""
    return synthetic.build_base_model(tmp_path_factory.mktemp("tiny-base") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_base_model_uri(tiny_base_model: Path) -> str:
    """``file://`` URI of the tiny base model folder."""
    return tiny_base_model.resolve().as_uri()


@pytest.fixture
def make_task_dataset(tmp_path: Path):
    """Factory writing a synthetic task dataset (JSONL) under tmp_path; returns its path."""

    def make(
        name: str = "train.jsonl",
        n: int = 200,
        seed: int = 0,
        format: str = "chat",
        variant: str = "a",
    ) -> Path:
        return synthetic.write_task_dataset(
            tmp_path / name, n=n, seed=seed, format=format, variant=variant
        )

    return make


@pytest.fixture(scope="session")
def task_eval_examples() -> list[dict[str, str]]:
    """Held-out examples of variant "a" for exact-match scoring."""
    return synthetic.task_examples(48, seed=999, variant="a")
