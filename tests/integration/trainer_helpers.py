"""Helpers for the trainer's integration tests: specs, subprocess runs, reading results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def make_spec(base_uri: str, train_uri: str, out_uri: str, **overrides: Any) -> dict[str, Any]:
    """A small FineTuneJob spec (wire form) for the tiny model; ``overrides`` replace top-level keys."""
    spec: dict[str, Any] = {
        "baseModel": {"uri": base_uri, "revision": "tiny-0"},
        "dataset": {"train": train_uri},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
        "hyperparameters": {
            "maxSteps": 20,
            "batchSize": 8,
            "learningRate": 3e-3,
            "scheduler": "constant",
            "warmupRatio": 0.0,
        },
        "evaluation": {"everySteps": 10},
        "checkpoint": {"everySteps": 5, "keepLast": 2},
        "output": {"uri": out_uri},
        "resources": {"gpus": 0},
    }
    for key, value in overrides.items():
        spec[key] = (
            value if not isinstance(value, dict) or key not in spec else {**spec[key], **value}
        )
    return spec


def trainer_env(
    spec: dict[str, Any], tmp: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """Environment of a trainer subprocess (contracts: KUBETUNE_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    env.update(
        {
            "KUBETUNE_SPEC": json.dumps(spec),
            "KUBETUNE_JOB_NAME": "tiny",
            "KUBETUNE_NAMESPACE": "default",
            "KUBETUNE_REPORT": (tmp / "progress.json").as_uri(),
            "KUBETUNE_TERMINATION_LOG": str(tmp / "termination.json"),
            "KUBETUNE_WORK_DIR": str(tmp / "work"),
            # One thread: two cores are shared with other test processes, and oversubscribed
            # BLAS threads slow tiny models down by an order of magnitude.
            "OMP_NUM_THREADS": "1",
            # This checkout's packages first: the venv's editable install may point at another
            # checkout (a worktree would otherwise test the main checkout's trainer).
            "PYTHONPATH": os.pathsep.join(
                str(REPO / d) for d in ("operator", "trainer-image", "server-image", ".")
            ),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
        }
    )
    env.update(extra or {})
    return env


def start(command: str, env: dict[str, str]) -> subprocess.Popen:
    """Start ``python -m kubetune_trainer <command>``."""
    return subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run(command: str, env: dict[str, str], timeout: float = 180) -> tuple[int, dict[str, Any], str]:
    """Run to the end: ``(exit code, termination message, stderr)``."""
    proc = start(command, env)
    _, err = proc.communicate(timeout=timeout)
    term = Path(env["KUBETUNE_TERMINATION_LOG"])
    message = json.loads(term.read_text()) if term.exists() else {}
    return proc.returncode, message, err


def load_weights(folder: Path) -> dict[str, Any]:
    """Tensors of every safetensors file in a folder."""
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def run_here(command: str, env: dict[str, str], monkeypatch) -> tuple[int, dict[str, Any]]:
    """Run ``main([command])`` in this process with ``env`` (cheaper than a subprocess)."""
    from kubetune_trainer.__main__ import main

    for key in [k for k in os.environ if k.startswith("KUBETUNE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("KUBETUNE_", "AWS_")):
            monkeypatch.setenv(key, value)
    code = main([command])
    term = Path(env["KUBETUNE_TERMINATION_LOG"])
    return code, (json.loads(term.read_text()) if term.exists() else {})
