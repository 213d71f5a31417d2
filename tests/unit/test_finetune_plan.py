"""FineTuneJob decision function: observe_job (Job + pods -> observation) and plan
(observations -> complete status + actions), as tables of scenarios.

Covers: creation -> validation Job; validation success -> data report + training Job in one
pass; validation failure -> Failed with the validator's message; preemption / eviction / OOM ->
restart after backoff with restarts counted once; exit 2 -> Failed without retry; restarts
exhausted; success -> artifact; suspend / resume; Kueue queueing; unschedulable for lack of
GPUs; image pull deadline; TTL; half-written states (stale Job of an earlier attempt, Job being
deleted, status written but Job not yet created, missing or non-JSON termination message);
idempotence (planning again from the written status changes nothing); condition semantics.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest

from kubetune.api import conditions as c
from kubetune.finetune import builders
from kubetune.finetune.reconcile import (
    ABSENT_JOB,
    CreateJob,
    DeleteFineTuneJob,
    DeleteJob,
    Event,
    JobObservation,
    Requeue,
    observe_job,
    plan,
)

NOW = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)


def later(seconds: float) -> datetime.datetime:
    return NOW + datetime.timedelta(seconds=seconds)


def make_ftj(status: dict | None = None, **spec: Any) -> dict:
    body: dict[str, Any] = {
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/demo"},
        "retry": {"maxRestarts": 2, "backoffSeconds": 30},
    }
    body.update(spec)
    obj = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "demo", "namespace": "default", "uid": "uid-1", "generation": 1},
        "spec": body,
    }
    if status is not None:
        obj["status"] = status
    return obj


def advance(ftj: dict, p) -> dict:
    """The FTJ as it is after the plan's status write."""
    return {**ftj, "status": p.status}


def cond(status: dict, type_: str) -> dict:
    found = c.get_condition(status.get("conditions"), type_)
    assert found is not None, f"no {type_} condition in {status.get('conditions')}"
    return found


def obs(state: str, **kw: Any) -> JobObservation:
    return JobObservation(state=state, name=kw.pop("name", "demo-train"), **kw)


VALIDATED = JobObservation(
    state="succeeded",
    name="demo-validate",
    termination={
        "outcome": "succeeded",
        "message": "ok",
        "dataReport": {
            "format": "chat",
            "valid": 98,
            "invalid": 2,
            "duplicates": 3,
            "bogusField": 1,
        },
    },
    exit_code=0,
)


def validated_ftj(**spec: Any) -> dict:
    """An FTJ whose validation succeeded and whose first training Job was created."""
    ftj = make_ftj(**spec)
    p = plan(ftj, VALIDATED, ABSENT_JOB, NOW)
    return advance(ftj, p)


# --- creation and validation --------------------------------------------------------------


def test_new_job_goes_validating_and_creates_the_validate_job():
    p = plan(make_ftj(), ABSENT_JOB, ABSENT_JOB, NOW)
    assert p.status["phase"] == "Validating"
    assert p.status["observedGeneration"] == 1 and p.status["restarts"] == 0
    assert cond(p.status, c.DATA_VALIDATED)["status"] == "Unknown"
    assert (
        cond(p.status, c.SUCCEEDED)["status"] == "False"
        and cond(p.status, c.FAILED)["status"] == "False"
    )
    (create,) = p.of(CreateJob)
    assert create.manifest == builders.build_validate_job(make_ftj())
    assert [e.reason for e in p.of(Event)] == [c.Reason.VALIDATING]


def test_replanning_from_the_written_status_is_idempotent():
    ftj = make_ftj()
    p1 = plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)
    running = obs("active", name="demo-validate")
    p2 = plan(advance(ftj, p1), running, ABSENT_JOB, later(5))
    assert p2.status == p1.status  # nothing to write
    assert p2.actions == []  # no duplicate Job, no repeated Event


def test_status_written_but_job_not_created_creates_it_again():
    # Crash between the status write and the create: the next pass sees Validating + no Job.
    ftj = make_ftj()
    p1 = plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)
    p2 = plan(advance(ftj, p1), ABSENT_JOB, ABSENT_JOB, later(1))
    assert len(p2.of(CreateJob)) == 1 and p2.of(Event) == []


def test_validation_success_records_the_report_and_starts_training_in_the_same_pass():
    ftj = make_ftj(resources={"gpus": 1})
    validating = advance(ftj, plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW))
    p = plan(validating, VALIDATED, ABSENT_JOB, later(60))
    assert p.status["dataReport"] == {"format": "chat", "valid": 98, "invalid": 2, "duplicates": 3}
    v = cond(p.status, c.DATA_VALIDATED)
    assert (
        v["status"] == "True"
        and v["reason"] == c.Reason.VALIDATION_SUCCEEDED
        and "98 valid" in v["message"]
    )
    assert p.status["phase"] == "Running"
    (create,) = p.of(CreateJob)
    assert create.manifest == builders.build_train_job(ftj, attempt=0)
    assert {e.reason for e in p.of(Event)} == {
        c.Reason.VALIDATION_SUCCEEDED,
        c.Reason.TRAINING_STARTED,
    }


def test_validation_failure_fails_with_the_validators_message():
    bad = obs(
        "failed",
        name="demo-validate",
        exit_code=2,
        reason="DataError",
        termination={
            "outcome": "data_error",
            "message": "train.jsonl:3: not valid JSON; 40% of lines invalid (max 5%)",
            "dataReport": {"valid": 6, "invalid": 4},
        },
        message="train.jsonl:3: not valid JSON; 40% of lines invalid (max 5%)",
    )
    ftj = make_ftj()
    p = plan(advance(ftj, plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)), bad, ABSENT_JOB, later(30))
    assert p.status["phase"] == "Failed"
    assert "train.jsonl:3" in p.status["message"]
    f = cond(p.status, c.FAILED)
    assert (
        f["status"] == "True"
        and f["reason"] == c.Reason.VALIDATION_FAILED
        and "train.jsonl:3" in f["message"]
    )
    assert cond(p.status, c.DATA_VALIDATED)["status"] == "False"
    assert p.status["dataReport"] == {"valid": 6, "invalid": 4}
    assert p.status["completionTime"]
    assert p.of(CreateJob) == []
    assert [e.type for e in p.of(Event)] == ["Warning"]


def test_memory_preflight_failure_fails_with_the_numbers_and_records_the_estimate():
    estimate = {"perGpuGib": 138.3, "gpuMemoryGib": 79.0, "fits": False, "parameters": 7248023552,
                "partsGib": {"weights": 121.5}, "message": "needs ~138.3 GiB per GPU, have 79.0: use ..."}  # fmt: skip
    bad = obs(
        "failed",
        name="demo-validate",
        exit_code=2,
        reason="ConfigError",
        termination={"outcome": "config_error", "message": estimate["message"],
                     "dataReport": {"valid": 10}, "memoryEstimate": {**estimate, "unknownField": 1}},  # fmt: skip
        message=estimate["message"],
    )
    ftj = make_ftj()
    p = plan(advance(ftj, plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)), bad, ABSENT_JOB, later(30))
    assert p.status["phase"] == "Failed"
    assert p.status["message"].startswith("memory pre-flight failed: needs ~138.3 GiB per GPU, have 79.0")
    assert p.status["memoryEstimate"] == estimate  # unknown fields dropped (structural schema)
    assert p.of(CreateJob) == []


def test_validation_success_records_the_memory_estimate():
    estimate = {"perGpuGib": 25.1, "gpuMemoryGib": 79.0, "fits": True, "message": "needs ~25.1 GiB"}
    ok = obs("succeeded", name="demo-validate", exit_code=0,
             termination={"outcome": "succeeded", "dataReport": {"valid": 10}, "memoryEstimate": estimate})  # fmt: skip
    ftj = make_ftj()
    p = plan(advance(ftj, plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)), ok, ABSENT_JOB, later(30))
    assert p.status["memoryEstimate"] == estimate
    assert p.status["phase"] in ("Running", "Pending")


# --- training -------------------------------------------------------------------------------


def test_running_training_is_summarised_from_the_trainers_progress():
    ftj = validated_ftj()
    ftj["status"]["progress"] = {"step": 40, "totalSteps": 100, "percent": 40}
    ftj["status"]["resumedFromStep"] = 20
    p = plan(ftj, VALIDATED, obs("active", attempt=0), later(10))
    assert p.status["phase"] == "Running"
    t = cond(p.status, c.TRAINING)
    assert t["status"] == "True" and t["reason"] == c.Reason.TRAINING_RUNNING
    assert "step 40/100" in p.status["message"] and "resumed from step 20" in p.status["message"]
    # trainer-owned fields pass through untouched
    assert p.status["progress"] == {"step": 40, "totalSteps": 100, "percent": 40}
    assert p.of(CreateJob) == [] and p.of(DeleteJob) == []


def test_success_publishes_the_artifact_and_is_final():
    ftj = validated_ftj()
    done = obs(
        "succeeded",
        attempt=0,
        exit_code=0,
        termination={
            "outcome": "succeeded",
            "message": "done",
            "step": 120,
            "metrics": {"trainLoss": 0.1, "evalLoss": 0.2, "bestEvalLoss": 0.19},
            "artifact": {
                "uri": "s3://out/demo/model/",
                "digest": "sha256:abc",
                "lineageUri": "s3://out/demo/model/lineage.json",
            },
        },
    )
    p = plan(ftj, VALIDATED, done, later(100))
    assert p.status["phase"] == "Succeeded"
    assert p.status["artifact"] == {
        "uri": "s3://out/demo/model/",
        "digest": "sha256:abc",
        "lineageUri": "s3://out/demo/model/lineage.json",
    }
    assert p.status["metrics"]["evalLoss"] == 0.2 and p.status["progress"]["percent"] == 100
    assert cond(p.status, c.SUCCEEDED)["status"] == "True"
    assert cond(p.status, c.TRAINING)["status"] == "False"
    assert p.status["completionTime"] == "2026-01-01T12:01:40Z"
    # Final: a later failure observation (or anything else) changes nothing.
    again = plan(advance(ftj, p), VALIDATED, obs("failed", attempt=0, exit_code=1), later(200))
    assert again.status == p.status and again.actions == []


def test_success_without_termination_message_uses_the_output_layout():
    p = plan(validated_ftj(), VALIDATED, obs("succeeded", attempt=0, exit_code=0), later(5))
    assert p.status["artifact"] == {"uri": "s3://out/demo/model/"}


@pytest.mark.parametrize(
    ("reason", "exit_code", "outcome"),
    [
        ("Preempted", 143, "preempted"),
        ("Evicted", None, None),
        ("NodeLost", None, None),
        ("OOMKilled", 137, None),
        ("StorageError", 3, "storage_error"),
        ("Error", 1, "other"),
    ],
)
def test_lost_or_failed_pod_restarts_after_backoff(reason, exit_code, outcome):
    ftj = validated_ftj()
    term = {"outcome": outcome, "message": f"{reason} happened", "step": 40} if outcome else None
    failed = obs("failed", attempt=0, exit_code=exit_code, reason=reason, termination=term)
    p = plan(ftj, VALIDATED, failed, later(10))
    assert p.status["restarts"] == 1
    assert p.status["lastFailureReason"] == reason
    assert p.status["phase"] == "Running"
    assert cond(p.status, c.TRAINING)["reason"] == c.Reason.RESTARTING
    assert [d.name for d in p.of(DeleteJob)] == ["demo-train"]
    assert p.of(Requeue) == [Requeue(30.0)]
    assert [e.reason for e in p.of(Event)] == [c.Reason.RESTARTING]
    # Job deleted; backoff not over: wait, do not create.
    waiting = plan(advance(ftj, p), VALIDATED, ABSENT_JOB, later(20))
    assert waiting.of(CreateJob) == [] and waiting.of(Requeue) == [Requeue(20.0)]
    assert waiting.status["restarts"] == 1
    # Backoff over: attempt 1, resuming.
    resumed = plan(advance(ftj, waiting), VALIDATED, ABSENT_JOB, later(41))
    (create,) = resumed.of(CreateJob)
    assert create.manifest == builders.build_train_job(ftj, attempt=1)
    assert cond(resumed.status, c.TRAINING)["reason"] == c.Reason.RESUMED
    assert [e.reason for e in resumed.of(Event)] == [c.Reason.RESUMED]


def test_stale_job_of_an_earlier_attempt_is_deleted_not_counted_again():
    # Status says restarts=1 (written) but the failed attempt-0 Job was not deleted (crash).
    ftj = validated_ftj()
    p = plan(ftj, VALIDATED, obs("failed", attempt=0, exit_code=143, reason="Preempted"), later(10))
    stale = plan(
        advance(ftj, p),
        VALIDATED,
        obs("failed", attempt=0, exit_code=143, reason="Preempted"),
        later(11),
    )
    assert stale.status["restarts"] == 1
    assert [d.name for d in stale.of(DeleteJob)] == ["demo-train"]
    assert stale.of(CreateJob) == [] and stale.of(Requeue) == [Requeue(1.0)]
    # Already being deleted: just wait.
    deleting = plan(
        advance(ftj, stale), VALIDATED, obs("failed", attempt=0, deleting=True), later(12)
    )
    assert deleting.of(DeleteJob) == [] and deleting.of(CreateJob) == []


def test_exit_2_fails_without_retry():
    failed = obs(
        "failed",
        attempt=0,
        exit_code=2,
        reason="DataError",
        termination={
            "outcome": "config_error",
            "message": "hyperparameters.batchSize too large for maxSeqLength",
        },
    )
    p = plan(validated_ftj(), VALIDATED, failed, later(10))
    assert p.status["phase"] == "Failed" and p.status["restarts"] == 0
    assert "batchSize" in cond(p.status, c.FAILED)["message"]
    assert p.of(CreateJob) == [] and p.of(Requeue) == []


def test_restarts_exhausted_fails_with_the_last_reason():
    ftj = validated_ftj()
    ftj["status"]["restarts"] = 2
    p = plan(
        ftj,
        VALIDATED,
        obs("failed", attempt=2, exit_code=1, reason="OOMKilled", message="CUDA out of memory"),
        later(10),
    )
    assert p.status["phase"] == "Failed"
    f = cond(p.status, c.FAILED)
    assert (
        f["reason"] == c.Reason.RESTARTS_EXHAUSTED
        and "OOMKilled" in f["message"]
        and "CUDA out of memory" in f["message"]
    )
    assert p.status["restarts"] == 2


def test_kueue_queued_job_is_reported_as_waiting_for_admission():
    ftj = validated_ftj(queueName="gpu")
    p = plan(ftj, VALIDATED, obs("active", attempt=0, queued=True), later(5))
    assert "Kueue" in p.status["message"] and "gpu" in p.status["message"]
    assert cond(p.status, c.TRAINING)["status"] == "False"


def test_unschedulable_for_lack_of_gpus_surfaces_the_schedulers_message():
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    p = plan(
        validated_ftj(),
        VALIDATED,
        obs("active", attempt=0, waiting_reason="Unschedulable", waiting_message=msg),
        later(5),
    )
    t = cond(p.status, c.TRAINING)
    assert (
        t["reason"] == c.Reason.INSUFFICIENT_GPUS
        and msg in t["message"]
        and msg in p.status["message"]
    )


def test_image_pull_failure_fails_after_the_deadline_only():
    pulling = obs(
        "active",
        attempt=0,
        waiting_reason="ImagePullBackOff",
        waiting_message="not found",
        waiting_since="2026-01-01T12:00:00Z",
    )
    early = plan(validated_ftj(), VALIDATED, pulling, later(60))
    assert early.status["phase"] == "Running" and early.of(Requeue)
    late = plan(validated_ftj(), VALIDATED, pulling, later(301))
    assert late.status["phase"] == "Failed"
    assert cond(late.status, c.FAILED)["reason"] == c.Reason.IMAGE_PULL
    assert [d.name for d in late.of(DeleteJob)] == ["demo-train"]


# --- suspend / resume -------------------------------------------------------------------------


def test_suspend_deletes_the_running_job_and_resume_recreates_it_without_counting_a_restart():
    ftj = validated_ftj()
    ftj["spec"]["suspend"] = True
    p = plan(ftj, VALIDATED, obs("active", attempt=0), later(10))
    assert p.status["phase"] == "Suspended"
    assert cond(p.status, c.SUSPENDED)["status"] == "True"
    assert [d.name for d in p.of(DeleteJob)] == ["demo-train"]
    # The pod killed by the suspension is not a failed attempt.
    killed = plan(
        advance(ftj, p),
        VALIDATED,
        obs("failed", attempt=0, exit_code=143, reason="Preempted"),
        later(11),
    )
    assert killed.status["restarts"] == 0 and killed.status["phase"] == "Suspended"
    quiet = plan(advance(ftj, p), VALIDATED, ABSENT_JOB, later(12))
    assert quiet.actions == []
    resumed_ftj = advance(ftj, quiet)
    resumed_ftj["spec"] = {**ftj["spec"], "suspend": False}
    r = plan(resumed_ftj, VALIDATED, ABSENT_JOB, later(20))
    assert r.status["phase"] == "Running" and r.status["restarts"] == 0
    assert cond(r.status, c.SUSPENDED)["status"] == "False"
    (create,) = r.of(CreateJob)
    assert create.manifest["metadata"]["annotations"][builders.ANNOTATION_ATTEMPT] == "0"
    assert [e.reason for e in r.of(Event)] == [c.Reason.RESUMED_FROM_SUSPEND]


def test_suspend_during_validation_stops_it_and_resume_validates_again():
    ftj = make_ftj(suspend=True)
    p = plan(ftj, obs("active", name="demo-validate"), ABSENT_JOB, NOW)
    assert p.status["phase"] == "Suspended"
    assert [d.name for d in p.of(DeleteJob)] == ["demo-validate"] and p.of(CreateJob) == []
    ftj2 = advance(ftj, p)
    ftj2["spec"] = {**ftj["spec"], "suspend": False}
    r = plan(ftj2, ABSENT_JOB, ABSENT_JOB, later(5))
    assert r.status["phase"] == "Validating"
    assert r.of(CreateJob)[0].manifest["metadata"]["name"] == "demo-validate"


# --- TTL, deletion, bad spec -----------------------------------------------------------------


def test_ttl_after_finished_requeues_then_deletes_the_finetunejob():
    ftj = validated_ftj(ttlSecondsAfterFinished=60)
    done = plan(ftj, VALIDATED, obs("succeeded", attempt=0, exit_code=0), later(0))
    assert done.of(Requeue) == [Requeue(60.0)]
    wait = plan(advance(ftj, done), VALIDATED, ABSENT_JOB, later(30))
    assert wait.of(Requeue) == [Requeue(30.0)] and wait.of(DeleteFineTuneJob) == []
    due = plan(advance(ftj, done), VALIDATED, ABSENT_JOB, later(61))
    assert len(due.of(DeleteFineTuneJob)) == 1


def test_object_being_deleted_is_left_alone():
    ftj = make_ftj()
    ftj["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    p = plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)
    assert p.actions == []


def test_malformed_spec_fails_naming_the_field_path():
    ftj = make_ftj(hyperparameters={"learningRate": -1})
    p = plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW)
    assert p.status["phase"] == "Failed"
    assert (
        "spec.hyperparameters.learningRate" in p.status["message"]
        or "spec.hyperparameters.learning_rate" in p.status["message"]
    )
    assert p.of(CreateJob) == []


def test_condition_transition_time_changes_only_when_status_flips():
    ftj = validated_ftj()
    p1 = plan(ftj, VALIDATED, obs("active", attempt=0), later(10))
    p2 = plan(advance(ftj, p1), VALIDATED, obs("active", attempt=0), later(500))
    assert (
        cond(p2.status, c.TRAINING)["lastTransitionTime"]
        == cond(p1.status, c.TRAINING)["lastTransitionTime"]
    )


# --- observe_job --------------------------------------------------------------------------------


def job(
    state: str | None = None, uid: str = "job-uid", attempt: int | None = 0, **spec: Any
) -> dict:
    meta: dict[str, Any] = {"name": "demo-train", "namespace": "default", "uid": uid}
    if attempt is not None:
        meta["annotations"] = {builders.ANNOTATION_ATTEMPT: str(attempt)}
    status: dict[str, Any] = {}
    if state == "Complete":
        status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    elif state == "Failed":
        status = {
            "failed": 1,
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}],
        }
    elif state == "DeadlineExceeded":
        status = {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "too long",
                }
            ]
        }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta,
        "spec": {"backoffLimit": 0, **spec},
        "status": status,
    }


def pod(
    uid: str = "job-uid",
    phase: str = "Failed",
    exit_code: int | None = None,
    reason: str | None = None,
    message: Any = None,
    conditions: list | None = None,
    waiting: dict | None = None,
    pod_reason: str | None = None,
    created: str = "2026-01-01T12:00:00Z",
) -> dict:
    state: dict[str, Any] = {}
    if exit_code is not None:
        text = json.dumps(message) if isinstance(message, dict) else (message or "")
        state = {
            "terminated": {"exitCode": exit_code, "reason": reason or "Error", "message": text}
        }
    elif waiting:
        state = {"waiting": waiting}
    status: dict[str, Any] = {
        "phase": phase,
        "containerStatuses": [{"name": "trainer", "state": state}],
    }
    if conditions:
        status["conditions"] = conditions
    if pod_reason:
        status["reason"] = pod_reason
    return {
        "metadata": {
            "name": "p",
            "creationTimestamp": created,
            "ownerReferences": [{"kind": "Job", "uid": uid}],
        },
        "status": status,
    }


OBSERVE_TABLE = [
    # (id, job, pods, expected fields)
    ("absent", None, [], {"state": "absent"}),
    ("no status yet", job(), [], {"state": "active", "attempt": 0}),
    (
        "complete with artifact",
        job("Complete"),
        [
            pod(
                phase="Succeeded",
                exit_code=0,
                reason="Completed",
                message={"outcome": "succeeded", "artifact": {"uri": "s3://o/model/"}},
            )
        ],
        {"state": "succeeded", "exit_code": 0},
    ),
    (
        "preempted by exit 143",
        job("Failed"),
        [
            pod(
                exit_code=143,
                message={"outcome": "preempted", "message": "checkpointed at step 40", "step": 40},
            )
        ],
        {"state": "failed", "reason": "Preempted", "message": "checkpointed at step 40"},
    ),
    (
        "preempted by DisruptionTarget",
        job("Failed"),
        [
            pod(
                exit_code=137,
                conditions=[
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "PreemptionByScheduler",
                    }
                ],
            )
        ],
        {"state": "failed", "reason": "Preempted"},
    ),
    (
        "node lost",
        job("Failed"),
        [
            pod(
                conditions=[
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "DeletionByTaintManager",
                    }
                ]
            )
        ],
        {"state": "failed", "reason": "NodeLost"},
    ),
    (
        "evicted",
        job("Failed"),
        [pod(pod_reason="Evicted")],
        {"state": "failed", "reason": "Evicted"},
    ),
    (
        "OOMKilled",
        job("Failed"),
        [pod(exit_code=137, reason="OOMKilled")],
        {"state": "failed", "reason": "OOMKilled", "exit_code": 137},
    ),
    (
        "exit 2 without message",
        job("Failed"),
        [pod(exit_code=2)],
        {"state": "failed", "reason": "DataError", "retryable": False},
    ),
    (
        "data error outcome",
        job("Failed"),
        [pod(exit_code=2, message={"outcome": "data_error", "message": "bad line 3"})],
        {"state": "failed", "reason": "DataError", "retryable": False, "message": "bad line 3"},
    ),
    (
        "non-JSON termination (logs fallback)",
        job("Failed"),
        [pod(exit_code=1, message="Traceback...\nRuntimeError: boom")],
        {
            "state": "failed",
            "reason": "Error",
            "termination": None,
            "message": "Traceback...\nRuntimeError: boom",
        },
    ),
    (
        "failed job, pods already gone",
        job("DeadlineExceeded"),
        [],
        {"state": "failed", "reason": "DeadlineExceeded", "message": "too long"},
    ),
    (
        "pods of an older Job with the same name are ignored",
        job("Failed"),
        [pod(uid="old-uid", exit_code=2, message={"outcome": "data_error"})],
        {"state": "failed", "reason": "Error", "retryable": True},
    ),
    (
        "unschedulable",
        job(),
        [
            pod(
                phase="Pending",
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "Insufficient nvidia.com/gpu",
                    }
                ],
            )
        ],
        {
            "state": "active",
            "waiting_reason": "Unschedulable",
            "waiting_message": "Insufficient nvidia.com/gpu",
        },
    ),
    (
        "image pull",
        job(),
        [pod(phase="Pending", waiting={"reason": "ImagePullBackOff", "message": "not found"})],
        {
            "state": "active",
            "waiting_reason": "ImagePullBackOff",
            "waiting_since": "2026-01-01T12:00:00Z",
        },
    ),
    ("queued by Kueue", job(suspend=True), [], {"state": "active", "queued": True}),
    (
        "being deleted",
        {**job(), "metadata": {**job()["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}},
        [],
        {"deleting": True},
    ),
    ("no attempt annotation", job(attempt=None), [], {"attempt": None}),
]


@pytest.mark.parametrize(
    ("job_obj", "pods", "expected"),
    [t[1:] for t in OBSERVE_TABLE],
    ids=[t[0] for t in OBSERVE_TABLE],
)
def test_observe_job(job_obj, pods, expected):
    o = observe_job(job_obj, pods)
    for key, value in expected.items():
        assert getattr(o, key) == value, (key, o)


def test_observe_multi_node_failure_prefers_the_pod_with_a_termination_message():
    j = job("Failed", completions=2, completionMode="Indexed")
    rank0 = pod(
        exit_code=143,
        message={"outcome": "preempted", "message": "rank 0 checkpointed", "step": 10},
    )
    rank1 = pod(exit_code=137, message="killed", created="2026-01-01T12:00:05Z")
    o = observe_job(j, [rank1, rank0])
    assert o.reason == "Preempted" and o.termination["step"] == 10


def test_plan_on_real_observations_end_to_end():
    """observe_job and plan together: validate Job complete -> train Job; preempted -> restart."""
    ftj = make_ftj()
    p = plan(ftj, observe_job(None, []), ABSENT_JOB, NOW)
    vjob = p.of(CreateJob)[0].manifest
    vjob["metadata"]["uid"] = "v-uid"
    vjob["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    vpod = pod(
        uid="v-uid",
        phase="Succeeded",
        exit_code=0,
        message={"outcome": "succeeded", "dataReport": {"valid": 10}},
    )
    ftj = advance(ftj, p)
    p = plan(ftj, observe_job(vjob, [vpod]), ABSENT_JOB, later(1))
    assert p.status["dataReport"] == {"valid": 10}
    tjob = p.of(CreateJob)[0].manifest
    tjob["metadata"]["uid"] = "t-uid"
    tjob["status"] = {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}
    tpod = pod(
        uid="t-uid",
        exit_code=143,
        message={"outcome": "preempted", "message": "SIGTERM", "step": 30},
    )
    ftj = advance(ftj, p)
    p = plan(ftj, observe_job(vjob, [vpod]), observe_job(tjob, [tpod]), later(2))
    assert p.status["restarts"] == 1 and p.status["lastFailureReason"] == "Preempted"


# --- every status the plan writes fits the CRD's status schema ------------------------------------


def _scenario_statuses() -> list[dict]:
    ftj = make_ftj()
    out = [plan(ftj, ABSENT_JOB, ABSENT_JOB, NOW).status]
    v = validated_ftj()
    out.append(v["status"])
    out.append(plan(v, VALIDATED, obs("active", attempt=0), later(1)).status)
    out.append(
        plan(
            v, VALIDATED, obs("failed", attempt=0, exit_code=143, reason="Preempted"), later(1)
        ).status
    )
    out.append(
        plan(
            v, VALIDATED, obs("failed", attempt=0, exit_code=2, reason="DataError"), later(1)
        ).status
    )
    out.append(
        plan(
            v,
            VALIDATED,
            obs(
                "succeeded",
                attempt=0,
                termination={
                    "artifact": {"uri": "s3://o/model/", "digest": "d"},
                    "metrics": {"evalLoss": 1.0},
                    "step": 3,
                },
            ),
            later(1),
        ).status
    )
    out.append(plan(make_ftj(suspend=True), ABSENT_JOB, ABSENT_JOB, NOW).status)
    out.append(plan(make_ftj(nodes=0), ABSENT_JOB, ABSENT_JOB, NOW).status)
    return out


@pytest.mark.parametrize("status", _scenario_statuses())
def test_planned_status_fits_the_status_schema(status):
    from kubetune.api.finetunejob import FineTuneJobStatus

    # extra="forbid": a misspelt field would be pruned silently by a real API server.
    parsed = FineTuneJobStatus.model_validate(status)
    assert parsed.phase == status["phase"]
