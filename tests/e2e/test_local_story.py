"""The README's main story on the local runtime (``kubetune demo --fast``), end to end.

Covers, with real trainer and server processes, the real router and generated traffic:
- two FineTuneJobs validate, train and publish an artifact; the eval accuracy (exact match on
  held-out prompts) rises during training, and the longer revision ends clearly above chance;
- the ModelDeployment's first revision goes straight to stable; the second is rolled out as a
  canary under traffic, its analysis intervals pass and it is promoted (it serves the traffic,
  and the answers it gives are right more often than the first revision's);
- a broken revision (server fault injection) is rolled back automatically: recorded in
  ``rejectedRevisions``, weight 0, and it receives no request after the rollback;
- when the story ends no process of the run is left (no orphans);
- a re-run with unchanged specs reuses the finished FineTuneJobs (no trainer process starts).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from kubetune.local.demo import MDEP, DemoSettings, Story, render_summary
from kubetune.local.store import Store
from tests.e2e.conftest import kubetune, processes_under

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> tuple[Story, Path]:
    work = tmp_path_factory.mktemp("demo")
    story = Story(work, DemoSettings.fast())
    asyncio.run(story.run())
    print(render_summary(story.summary, 0))
    return story, work


def test_story_completes(story):
    s, _ = story
    assert s.summary.ok, s.summary
    assert not s.summary.interrupted


def test_accuracy_rises_during_training_and_with_the_longer_revision(story):
    s, _ = story
    v1 = s.summary.accuracy_history["assistant-v1"]
    v2 = s.summary.accuracy_history["assistant-v2"]
    assert len(v2) >= 2
    assert v2[-1] > v2[0]
    # Chance is 1/24 (~4%): the longer fine-tune must have learnt the task.
    assert v2[-1] >= 0.5
    assert v2[-1] > v1[-1]
    for name in ("assistant-v1", "assistant-v2"):
        job = s.summary.jobs[name]
        assert job["phase"] == "Succeeded"
        assert (
            job["artifact"]
            and Path(job["artifact"].removeprefix("file://"), "lineage.json").exists()
        )


def test_canary_is_promoted_under_traffic_after_analysis(story):
    s, _ = story
    status = s.summary.final_status
    assert status["stable"]["fineTuneJob"] == "assistant-v2"
    promoted = status["stable"]["name"]
    passed = [
        a
        for a in status.get("analysis", [])
        if a["revision"] == promoted and a["phase"] == "Successful"
    ]
    assert passed, status.get("analysis")
    events = [json.loads(line) for line in (s.store.root / "events.jsonl").read_text().splitlines()]
    assert any(e["reason"] == "Promoted" and promoted in e["message"] for e in events)
    traffic = s.summary.traffic
    assert traffic[promoted]["answered"] > 0
    v1_revision = next(
        rev for rev in traffic if rev not in (promoted, "none") and rev not in _rejected(status)
    )
    assert traffic[promoted]["correct"] / traffic[promoted]["answered"] > traffic[v1_revision][
        "correct"
    ] / max(1, traffic[v1_revision]["answered"])


def _rejected(status):
    return {r["name"] for r in status.get("rejectedRevisions", [])}


def test_broken_revision_is_rolled_back_to_weight_zero(story):
    s, _ = story
    status = s.summary.final_status
    rejected = _rejected(status)
    assert len(rejected) == 1
    bad = rejected.pop()
    assert "AnalysisFailed" in status["rejectedRevisions"][0]["reason"]
    assert status["phase"] == "RolledBack"
    assert status["weights"]["canary"] == 0 and status["weights"]["stable"] == 100
    assert "canary" not in status
    # It did get traffic (the canary step), answered with errors, and got nothing after the rollback.
    codes = s.summary.traffic[bad]["codes"]
    assert any(int(code) >= 500 for code in codes)
    assert s.requests_after_rollback.get(bad, 0) == 0


def test_no_process_is_left_after_the_story(story):
    s, work = story
    assert processes_under(work) == []
    assert json.loads(s.store.registry.read_text()) == []


def test_rerun_reuses_finished_finetunejobs(story, tmp_path):
    s, work = story
    # The FineTuneJobs' part of the store (the servers' restart is not what this is about).
    state = tmp_path / "state"
    shutil.copytree(s.store.root / "objects" / "finetunejobs", state / "objects" / "finetunejobs")
    result = kubetune(
        "local", "apply", "-f", str(work / "manifests" / "assistant-v1.yaml"), "--dir", str(state),
        "--exit-when-settled", "--timeout", "60",
    )  # fmt: skip
    assert "finetunejob.kubetune.io/assistant-v1 unchanged" in result.stdout
    assert not (state / "run").exists(), (
        "no trainer process may start for an unchanged, finished job"
    )
    assert Store(state).get("FineTuneJob", "assistant-v1")["status"]["phase"] == "Succeeded"


def test_status_shows_objects_in_the_clusters_shape(story):
    _, work = story
    state = str(work / "state")
    table = kubetune("local", "status", "--dir", state).stdout
    # `kubectl get ftj` / `kubectl get mdep` columns, then the progress lines.
    assert "NAME           PHASE       PROGRESS   EVAL LOSS   AGE" in table
    assert "NAME        PHASE        REPLICAS   STABLE       CANARY   WEIGHT   AGE" in table
    assert "ftj/assistant-v2" in table and "Succeeded" in table
    assert f"mdep/{MDEP}" in table and "RolledBack" in table
    obj = json.loads(kubetune("local", "status", "mdep", MDEP, "-o", "json", "--dir", state).stdout)
    assert obj["apiVersion"] == "kubetune.io/v1alpha1" and obj["kind"] == "ModelDeployment"
    assert {c["type"] for c in obj["status"]["conditions"]} >= {"Ready", "Progressing", "Degraded"}
