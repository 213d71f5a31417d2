"""Stopping the local runtime leaves nothing behind: Ctrl-C, ``delete --all``, a crashed controller.

Covers, with the real ``kubetune local apply`` controller running a trainer and a server:
- Ctrl-C (SIGINT to the controller) stops every process group; the trainer, stopped with
  SIGTERM like a drained node's pod, saves a complete checkpoint first; the controller exits 0;
- ``kubetune local delete --all`` from another terminal stops the controller and its children,
  and the objects are gone;
- a controller killed with SIGKILL cannot clean up, yet its children still go (PDEATHSIG), and
  the next ``delete --all`` finds nothing left to stop;
- ``kubetune local status`` talks to the running controller's store in the cluster's shape;
  ``kubetune local traffic`` sends requests through the running router.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from kubetune.local.demo import DemoSettings, finetunejob
from kubetune.local.processes import read_registry
from tests.e2e.conftest import REPO, kubetune, processes_under, wait_for

pytestmark = pytest.mark.slow


def _manifests(assets: Path, out: Path) -> Path:
    """A long FineTuneJob (checkpoints only on SIGTERM) and a ModelDeployment of the bare base."""
    paths = {"base": assets / "models" / "base", "train": assets / "data" / "train.jsonl"}
    ftj = finetunejob("long", out, paths, steps=100000, settings=DemoSettings.fast(), seed=1)
    ftj["spec"]["checkpoint"] = {"everySteps": 100000, "keepLast": 1}
    ftj["spec"]["evaluation"] = {"everySteps": 100000}
    mdep = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "base"},
        "spec": {
            "model": {"baseModel": {"uri": paths["base"].resolve().as_uri()}},
            "replicas": 1,
            "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
        },
    }
    folder = out / "manifests"
    folder.mkdir(parents=True)
    (folder / "long.yaml").write_text(yaml.safe_dump(ftj))
    (folder / "base.yaml").write_text(yaml.safe_dump(mdep))
    return folder


def _start_controller(manifests: Path, state: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune.cli",
            "local",
            "apply",
            "-f",
            str(manifests),
            "--dir",
            str(state),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )


def _serving(state: Path) -> bool:
    """The server answers through the router."""
    try:
        url = json.loads((state / "endpoints.json").read_text())["base"]
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError, KeyError):
        return False


def _training(state: Path) -> bool:
    """The trainer reported its first step."""
    try:
        report = json.loads((state / "run" / "job_long-train" / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return (report.get("progress") or {}).get("step", 0) >= 1


@pytest.fixture
def running(request, tmp_path, demo_assets):
    manifests = _manifests(demo_assets, tmp_path)
    if getattr(request, "param", "both") == "server only":
        # The trainer's part is covered by the Ctrl-C test; here it would only slow the server.
        (manifests / "long.yaml").unlink()
    state = tmp_path / "state"
    log = tmp_path / "controller.log"
    proc = _start_controller(manifests, state, log)
    try:
        wait_for(lambda: _serving(state) or proc.poll() is not None, 120, "the server to answer")
        assert proc.poll() is None, log.read_text()
        yield proc, tmp_path, state, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_ctrl_c_stops_everything_and_the_trainer_checkpoints_first(running):
    proc, work, state, log = running
    wait_for(lambda: _training(state), 120, "the trainer's first step")
    names = {e["name"] for e in read_registry(state / "processes.json")}
    assert "job/long-train" in names and any(n.startswith("server/base-") for n in names), names
    assert processes_under(work)

    status = kubetune("local", "status", "--dir", str(state)).stdout
    assert (
        f"controller: running (pid {proc.pid})" in status
        and "ftj/long" in status
        and "Running" in status
    )

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0, log.read_text()
    assert processes_under(work) == []
    assert read_registry(state / "processes.json") == []
    checkpoints = list((work / "artifacts" / "long" / "checkpoints").glob("step-*/manifest.json"))
    assert checkpoints, "the trainer should save a checkpoint on SIGTERM"
    assert "stopping every local process" in log.read_text()


@pytest.mark.parametrize("running", ["server only"], indirect=True)
def test_delete_all_stops_the_controller_and_its_children(running):
    proc, work, state, _ = running
    # Traffic through the router first: the endpoint answers, counted per revision.
    sent = kubetune(
        "local", "traffic", "base", "--seconds", "2", "--rps", "10", "--dir", str(state)
    ).stdout
    assert re.search(r"^  [0-9a-f]{10}: \d+ requests, \d+ ok", sent, flags=re.M), sent
    result = kubetune("local", "delete", "--all", "--dir", str(state))
    assert "modeldeployment/base deleted" in result.stdout
    assert proc.wait(timeout=60) == 0
    assert processes_under(work) == []
    assert "no objects" in kubetune("local", "status", "--dir", str(state)).stdout


@pytest.mark.parametrize("running", ["server only"], indirect=True)
def test_killed_controller_leaves_no_orphans(running):
    proc, work, state, _ = running
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # PDEATHSIG: the kernel sends SIGTERM to each child when the controller dies.
    wait_for(lambda: processes_under(work) == [], 90, "the children of a killed controller to exit")
    result = kubetune("local", "delete", "--all", "--dir", str(state))
    assert "stopped" not in result.stdout  # nothing was left for the registry sweep
