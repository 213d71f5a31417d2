"""examples/local/ and the demo's manifests come from one source and load in the local runtime.

Covers: every file of examples/local/ is exactly what ``kubetune.local.demo.render_examples``
writes (so the README's manifests and the demo cannot drift apart); each loads with the local
runtime's validating loader; the broken step differs from the canary step only by the fault
injection env (a new revision for the same artifact).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.local.demo import render_examples
from kubetune.local.loading import load_manifests

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "local"
RENDERED = render_examples()


@pytest.mark.parametrize("name", sorted(RENDERED))
def test_example_file_matches_the_demo_rendering(name):
    assert (EXAMPLES / name).read_text() == RENDERED[name], (
        "examples/local drifted from kubetune.local.demo: re-render with render_examples()"
    )


def test_no_stray_files_in_examples_local():
    files = {str(p.relative_to(EXAMPLES)) for p in EXAMPLES.rglob("*.yaml")}
    assert files == set(RENDERED)


def test_examples_load_and_the_broken_step_only_adds_the_fault_env():
    docs = load_manifests(EXAMPLES)
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("FineTuneJob", "assistant-v1"),
        ("FineTuneJob", "assistant-v2"),
        ("ModelDeployment", "assistant"),
    ]
    (canary,) = load_manifests(EXAMPLES / "steps" / "canary.yaml")
    (broken,) = load_manifests(EXAMPLES / "steps" / "broken.yaml")
    env = broken["spec"]["server"].pop("env")
    assert env == [{"name": "KUBETUNE_FAULT_ERROR_RATE", "value": "0.5"}]
    assert broken == canary
