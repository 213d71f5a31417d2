"""The local kubelet/Job controller of kubetune.local.jobs, with real (tiny) child processes.

Covers: a finished process reads as the Job and pod the API server would return, and
``observe_job`` (the operator's own reducer) classifies it from that: exit 0 succeeds with the
termination message parsed; exit 2 with an ``outcome: data_error`` message is a non-retryable
DataError; a SIGKILL nobody sent reads as exit 137 / Error saying what is known (OOMKilled only
when the kernel's OOM counter confirms it); a running process is an active
Job; the trainer's progress fragment contributes only the trainer-owned status fields; the
process gets the report and termination-log paths of its run folder; a finished FineTuneJob
runs again only when its spec changed (a new generation), never on an unchanged re-apply.
"""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from kubetune.finetune.reconcile import ACTIVE, FAILED, SUCCEEDED, observe_job
from kubetune.local.jobs import UNEXPLAINED_SIGKILL, JobDriver, kubelet_exit_code, terminated_reason
from kubetune.local.processes import Supervisor
from kubetune.local.store import Store


def _job(name: str, script: str) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"kubetune.io/owner": "demo"}},
        "spec": {
            "template": {
                "metadata": {"labels": {"kubetune.io/owner": "demo"}},
                "spec": {"containers": [{"name": "trainer", "command": ["python", "-c", script]}]},
            }
        },
    }


WRITE_AND_EXIT = """
import json, os, sys
open(os.environ["KUBETUNE_TERMINATION_LOG"], "w").write(json.dumps({"outcome": sys.argv[1] if len(sys.argv) > 1 else "%s", "message": "done"}))
report = os.environ["KUBETUNE_REPORT"].removeprefix("file://")
open(report, "w").write(json.dumps({"progress": {"step": 7, "totalSteps": 10}, "metrics": {"evalAccuracy": 0.5}, "phase": "Hacked"}))
sys.exit(%d)
"""


async def _run(tmp_path, script: str, name: str = "demo-train"):
    store = Store(tmp_path)
    supervisor = Supervisor(registry=store.registry, grace_seconds=2)
    driver = JobDriver(store, supervisor)
    ftj = {"metadata": {"name": "demo"}, "spec": {}}
    await driver._create_job(ftj, _job(name, script))
    await supervisor.wait(f"job/{name}")
    return driver, observe_job(*driver._observed(name))


@pytest.mark.parametrize(
    ("outcome", "code", "state", "reason", "retryable"),
    [
        ("succeeded", 0, SUCCEEDED, None, True),
        ("data_error", 2, FAILED, "DataError", False),
        ("storage_error", 3, FAILED, "StorageError", True),
    ],
)
async def test_finished_process_reads_as_a_job_with_its_termination_message(
    tmp_path, outcome, code, state, reason, retryable
):
    driver, obs = await _run(tmp_path, WRITE_AND_EXIT % (outcome, code))
    assert obs.state == state
    assert obs.exit_code == code
    assert obs.termination == {"outcome": outcome, "message": "done"}
    assert obs.reason == reason
    assert obs.retryable is retryable
    fragment = driver._trainer_fragment("demo")
    assert fragment == {"progress": {"step": 7, "totalSteps": 10}, "metrics": {"evalAccuracy": 0.5}}


async def test_unexpected_sigkill_reads_as_exit_137_and_says_what_is_known(tmp_path):
    _, obs = await _run(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert obs.state == FAILED
    assert obs.exit_code == 137
    # No OOM kill was recorded by the kernel meanwhile: not claimed to be one.
    assert obs.reason == "Error"
    assert obs.message == UNEXPLAINED_SIGKILL


@pytest.mark.parametrize(
    ("exit_code", "by_us", "oom", "reason", "needle"),
    [
        (0, False, (0, 0), "Completed", None),
        (137, False, (3, 3), "Error", "not by kubetune; out of memory is one possible cause"),
        (137, False, (None, None), "Error", "not by kubetune"),
        (
            137,
            False,
            (3, 4),
            "OOMKilled",
            "OOM killer ran while it lived (/proc/vmstat oom_kill +1)",
        ),
        (137, True, (3, 4), "Error", None),
        (1, False, (3, 4), "Error", None),
    ],
)
def test_sigkill_is_oomkilled_only_when_the_kernel_says_so(exit_code, by_us, oom, reason, needle):
    got_reason, message = terminated_reason(exit_code, by_us, *oom)
    assert got_reason == reason
    assert (needle in message) if needle else message is None


async def test_running_process_is_an_active_job_and_deleting_it_stops_it(tmp_path):
    store = Store(tmp_path)
    supervisor = Supervisor(registry=store.registry, grace_seconds=2)
    driver = JobDriver(store, supervisor, grace_seconds=2)
    await driver._create_job(
        {"metadata": {"name": "demo"}}, _job("demo-train", "import time; time.sleep(60)")
    )
    assert observe_job(*driver._observed("demo-train")).state == ACTIVE
    managed = supervisor.get("job/demo-train")
    await driver._delete_job("demo-train", "test")
    assert managed is not None and not managed.running
    assert observe_job(*driver._observed("demo-train")).state == "absent"
    assert json.loads(store.registry.read_text()) == []


def test_kubelet_exit_codes():
    assert kubelet_exit_code(0) == 0
    assert kubelet_exit_code(3) == 3
    assert kubelet_exit_code(-15) == 143
    assert kubelet_exit_code(-9) == 137
    assert kubelet_exit_code(None) is None


def test_python_in_the_container_is_this_interpreter(tmp_path):
    async def main():
        _, obs = await _run(
            tmp_path, f"import sys; sys.exit(0 if sys.executable == {sys.executable!r} else 1)"
        )
        return obs

    assert asyncio.run(main()).state == SUCCEEDED


async def test_finished_job_with_a_new_spec_generation_starts_over_and_an_unchanged_one_does_not(
    tmp_path,
):
    store = Store(tmp_path)
    driver = JobDriver(store, Supervisor())
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo"},
        "spec": {"hyperparameters": {"maxSteps": 5}},
    }
    obj, _ = store.apply(manifest)
    store.write_status("FineTuneJob", "demo", {"phase": "Succeeded", "observedGeneration": 1})
    same, outcome = store.apply(manifest)
    assert outcome == "unchanged"
    assert (await driver._restart_if_spec_changed(same))["status"]["phase"] == "Succeeded"
    manifest["spec"]["hyperparameters"]["maxSteps"] = 10
    changed, outcome = store.apply(manifest)
    assert outcome == "configured" and changed["metadata"]["generation"] == 2
    assert (await driver._restart_if_spec_changed(changed))["status"] == {}
    assert store.get("FineTuneJob", "demo")["status"] == {}
