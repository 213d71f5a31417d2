"""The real operator (kopf run -m kubetune.handlers under KopfRunner) reconciling FineTuneJobs
against kmock's API on loopback; the tests play the Job controller, the kubelet and the trainer.

Covers: create -> validate Job with the contract spec/env -> validation succeeds (termination
message) -> data report + RBAC + GPU train Job -> pod preempted -> restart with backoff,
restarts=1, KUBETUNE_ATTEMPT=1 -> trainer reports resumedFromStep -> success -> Succeeded with
the artifact, conditions and Events; invalid data -> Failed with the validator's message and no
GPU Job; exit 2 in training -> Failed without retry; restarts exhausted; suspend / resume;
deletion garbage-collects the children and nothing is recreated; an operator restart mid-way
creates no duplicate children.
"""

from __future__ import annotations

import copy
import json

from kubetune.api import conditions as c
from tests.plugins.kube import (
    condition,
    fail_job,
    finish_job,
    set_pod_unschedulable,
    start_job,
    start_operator,
    wait_for,
    wait_for_object,
)

API = "kubetune.io/v1alpha1"
NS = "default"

FTJ = {
    "apiVersion": API,
    "kind": "FineTuneJob",
    "metadata": {"name": "demo", "namespace": NS},
    "spec": {
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/demo"},
        "resources": {
            "gpus": 1,
            "gpuNodeSelector": {"gpu": "h100"},
            "priorityClassName": "training",
        },
        "retry": {"maxRestarts": 2, "backoffSeconds": 1},
    },
}

DATA_OK = {
    "outcome": "succeeded",
    "message": "data valid",
    "dataReport": {
        "format": "chat",
        "totalLines": 100,
        "valid": 98,
        "invalid": 2,
        "duplicates": 1,
        "trainExamples": 88,
        "validationExamples": 9,
        "reportUri": "s3://out/demo/data/report.json",
    },
}
ARTIFACT = {
    "uri": "s3://out/demo/model/",
    "digest": "sha256:feed",
    "lineageUri": "s3://out/demo/model/lineage.json",
}


def ftj(name: str = "demo", **spec) -> dict:
    obj = copy.deepcopy(FTJ)
    obj["metadata"]["name"] = name
    obj["spec"]["output"]["uri"] = f"s3://out/{name}"
    obj["spec"].update(spec)
    return obj


def env_of(job: dict) -> dict:
    return {
        e["name"]: e.get("value", e.get("valueFrom"))
        for e in job["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def phase_is(phase: str):
    return lambda obj: (obj.get("status") or {}).get("phase") == phase


async def get_ftj(kube, name: str = "demo") -> dict:
    obj = await kube.get(API, "FineTuneJob", NS, name)
    assert obj is not None
    return obj


async def wait_ftj(kube, predicate, name: str = "demo", timeout: float = 20) -> dict:
    return await wait_for_object(kube, API, "FineTuneJob", NS, name, predicate, timeout=timeout)


async def wait_job(kube, name: str, predicate=bool) -> dict:
    return await wait_for_object(kube, "batch/v1", "Job", NS, name, predicate)


async def events_of(kube, name: str = "demo") -> list[str]:
    events = await kube.list("v1", "Event", NS)
    return [e["reason"] for e in events if e.get("involvedObject", {}).get("name") == name]


async def validated_and_training(kube, name: str = "demo") -> dict:
    await wait_job(kube, f"{name}-validate")
    await finish_job(kube, NS, f"{name}-validate", message=DATA_OK)
    return await wait_job(kube, f"{name}-train")


# --- the whole life cycle -----------------------------------------------------------------


async def test_create_validate_train_preempt_resume_succeed(kube, operator):
    created, _ = await kube.create(ftj())
    uid = created["metadata"]["uid"]

    # 1. Validating: a CPU Job running the validator with the contract env.
    vjob = await wait_job(kube, "demo-validate")
    container = vjob["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "kubetune_trainer", "validate"]
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    env = env_of(vjob)
    assert (
        env["KUBETUNE_JOB_NAME"] == "demo"
        and env["KUBETUNE_JOB_UID"] == uid
        and env["KUBETUNE_REPORT"] == "k8s"
    )
    assert json.loads(env["KUBETUNE_SPEC"])["output"]["uri"] == "s3://out/demo"
    assert vjob["metadata"]["ownerReferences"][0]["uid"] == uid
    obj = await wait_ftj(kube, phase_is("Validating"))
    assert condition(obj, c.DATA_VALIDATED)["status"] == "Unknown"
    assert obj["status"]["observedGeneration"] == 1
    assert (
        await kube.get("batch/v1", "Job", NS, "demo-train") is None
    )  # no GPU before the data is valid

    # 2. Validation succeeds: report in status, RBAC and the GPU Job.
    await finish_job(kube, NS, "demo-validate", message=DATA_OK)
    tjob = await wait_job(kube, "demo-train")
    pod = tjob["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "training"
    assert pod["serviceAccountName"] == "demo-trainer"
    assert env_of(tjob)["KUBETUNE_ATTEMPT"] == "0"
    role = await kube.get("rbac.authorization.k8s.io/v1", "Role", NS, "demo-trainer")
    assert role["rules"][0]["resourceNames"] == ["demo"] and role["rules"][0]["resources"] == [
        "finetunejobs/status"
    ]
    assert await kube.get("v1", "ServiceAccount", NS, "demo-trainer") is not None
    assert (
        await kube.get("rbac.authorization.k8s.io/v1", "RoleBinding", NS, "demo-trainer")
        is not None
    )
    obj = await wait_ftj(kube, lambda o: condition(o, c.DATA_VALIDATED)["status"] == "True")
    assert obj["status"]["dataReport"]["valid"] == 98 and obj["status"]["dataReport"][
        "reportUri"
    ].endswith("report.json")

    # 3. Running.
    await start_job(kube, NS, "demo-train")
    obj = await wait_ftj(
        kube, lambda o: (condition(o, c.TRAINING) or {}).get("reason") == c.Reason.TRAINING_RUNNING
    )
    assert obj["status"]["phase"] == "Running" and condition(obj, c.TRAINING)["status"] == "True"

    # 4. Pod preempted (SIGTERM checkpoint, exit 143): a new attempt after the backoff.
    first_uid = tjob["metadata"]["uid"]
    await fail_job(
        kube,
        NS,
        "demo-train",
        exit_code=143,
        message={
            "outcome": "preempted",
            "message": "preempted; checkpoint step-40 saved",
            "step": 40,
        },
    )
    tjob2 = await wait_job(kube, "demo-train", lambda j: j["metadata"]["uid"] != first_uid)
    assert env_of(tjob2)["KUBETUNE_ATTEMPT"] == "1"
    obj = await wait_ftj(kube, lambda o: o["status"].get("restarts") == 1)
    assert obj["status"]["lastFailureReason"] == "Preempted"

    # The trainer of attempt 1 reports where it resumed (progress channel).
    await kube.patch(
        API,
        "FineTuneJob",
        NS,
        "demo",
        {
            "status": {
                "resumedFromStep": 40,
                "progress": {"step": 50, "totalSteps": 100, "percent": 50},
            }
        },
        subresource="status",
    )
    await start_job(kube, NS, "demo-train")
    obj = await wait_ftj(
        kube, lambda o: "resumed from step 40" in (o["status"].get("message") or "")
    )

    # 5. Success: artifact and metrics from the termination message.
    await finish_job(
        kube,
        NS,
        "demo-train",
        message={
            "outcome": "succeeded",
            "message": "done",
            "step": 100,
            "metrics": {"trainLoss": 0.1, "evalLoss": 0.2, "bestEvalLoss": 0.2},
            "artifact": ARTIFACT,
        },
    )
    obj = await wait_ftj(kube, phase_is("Succeeded"))
    st = obj["status"]
    assert st["artifact"] == ARTIFACT
    assert st["restarts"] == 1 and st["resumedFromStep"] == 40
    assert st["metrics"]["evalLoss"] == 0.2 and st["progress"]["percent"] == 100
    assert condition(obj, c.SUCCEEDED)["status"] == "True"  # kubectl wait --for=condition=Succeeded
    assert condition(obj, c.FAILED)["status"] == "False"
    assert st["completionTime"] and st["startTime"]
    reasons = await wait_for(
        lambda: _reasons_include(
            kube,
            {
                c.Reason.VALIDATING,
                c.Reason.VALIDATION_SUCCEEDED,
                c.Reason.TRAINING_STARTED,
                c.Reason.RESTARTING,
                c.Reason.RESUMED,
                c.Reason.TRAINING_SUCCEEDED,
            },
        ),
        what="Events",
    )
    assert reasons
    jobs = [
        j
        for j in await kube.list("batch/v1", "Job", NS)
        if j["metadata"]["name"].startswith("demo-")
    ]
    assert sorted(j["metadata"]["name"] for j in jobs) == ["demo-train", "demo-validate"]


async def _reasons_include(kube, wanted: set[str]):
    have = set(await events_of(kube))
    return have if wanted <= have else None


# --- failures ------------------------------------------------------------------------------


def reconciles_ok() -> float:
    from kubetune.metrics import REGISTRY

    value = REGISTRY.get_sample_value(
        "kubetune_operator_reconciles_total", {"kind": "FineTuneJob", "result": "ok"}
    )
    return value or 0.0


async def test_invalid_data_fails_with_the_validators_message_and_no_gpu_job(kube, operator):
    before = reconciles_ok()
    await kube.create(ftj("bad"))
    await wait_job(kube, "bad-validate")
    msg = "train.jsonl:3: not valid JSON (Expecting value); 4 of 10 lines invalid, more than maxInvalidFraction 0.05"
    await fail_job(
        kube,
        NS,
        "bad-validate",
        exit_code=2,
        message={
            "outcome": "data_error",
            "message": msg,
            "dataReport": {"totalLines": 10, "valid": 6, "invalid": 4},
        },
    )
    obj = await wait_ftj(kube, phase_is("Failed"), name="bad")
    assert msg in obj["status"]["message"]
    failed = condition(obj, c.FAILED)
    assert (
        failed["status"] == "True"
        and failed["reason"] == c.Reason.VALIDATION_FAILED
        and msg in failed["message"]
    )
    assert condition(obj, c.DATA_VALIDATED)["status"] == "False"
    assert obj["status"]["dataReport"]["invalid"] == 4
    assert await kube.get("batch/v1", "Job", NS, "bad-train") is None
    await wait_for(
        lambda: _reasons_include_for(kube, "bad", {c.Reason.VALIDATION_FAILED}),
        what="InvalidData Event",
    )
    assert reconciles_ok() >= before + 2  # the operator's own metrics count our reconciles


async def _reasons_include_for(kube, name: str, wanted: set[str]):
    have = set(await events_of(kube, name))
    return have if wanted <= have else None


async def test_exit_2_in_training_fails_without_retry(kube, operator):
    await kube.create(ftj("cfg"))
    await validated_and_training(kube, "cfg")
    await fail_job(
        kube,
        NS,
        "cfg-train",
        exit_code=2,
        message={"outcome": "config_error", "message": "batchSize 4096 does not fit maxSeqLength"},
    )
    obj = await wait_ftj(kube, phase_is("Failed"), name="cfg")
    assert (
        obj["status"]["restarts"] == 0 and "batchSize 4096" in condition(obj, c.FAILED)["message"]
    )


async def test_restarts_exhausted_fails_with_the_last_reason(kube, operator):
    await kube.create(ftj("oom", retry={"maxRestarts": 0, "backoffSeconds": 0}))
    await validated_and_training(kube, "oom")
    await fail_job(kube, NS, "oom-train", exit_code=137, reason="OOMKilled")
    obj = await wait_ftj(kube, phase_is("Failed"), name="oom")
    failed = condition(obj, c.FAILED)
    assert failed["reason"] == c.Reason.RESTARTS_EXHAUSTED and "OOMKilled" in failed["message"]
    assert obj["status"]["lastFailureReason"] == "OOMKilled"


# --- suspend / resume, deletion, operator restart ---------------------------------------------


async def test_suspend_deletes_the_training_job_and_resume_recreates_it(kube, operator):
    await kube.create(ftj("sus"))
    tjob = await validated_and_training(kube, "sus")
    await start_job(kube, NS, "sus-train")
    await kube.patch(API, "FineTuneJob", NS, "sus", {"spec": {"suspend": True}})
    obj = await wait_ftj(kube, phase_is("Suspended"), name="sus")
    assert condition(obj, c.SUSPENDED)["status"] == "True"
    assert obj["status"]["observedGeneration"] == 2
    await wait_for(lambda: _absent(kube, "sus-train"), what="train Job deleted")

    await kube.patch(API, "FineTuneJob", NS, "sus", {"spec": {"suspend": False}})
    again = await wait_job(
        kube, "sus-train", lambda j: j["metadata"]["uid"] != tjob["metadata"]["uid"]
    )
    assert env_of(again)["KUBETUNE_ATTEMPT"] == "0"
    obj = await wait_ftj(kube, phase_is("Running"), name="sus")
    assert obj["status"]["restarts"] == 0 and condition(obj, c.SUSPENDED)["status"] == "False"
    assert obj["status"]["observedGeneration"] == 3


async def _absent(kube, job: str) -> bool:
    return await kube.get("batch/v1", "Job", NS, job) is None


async def test_deleting_the_finetunejob_removes_its_children_and_nothing_comes_back(kube, operator):
    await kube.create(ftj("gone"))
    await validated_and_training(kube, "gone")
    assert await kube.delete(API, "FineTuneJob", NS, "gone")
    await wait_for(lambda: _absent(kube, "gone-train"), what="train Job collected")
    # A later object is fully handled, so the operator has seen the deletion's events by then.
    await kube.create(ftj("after"))
    await wait_job(kube, "after-validate")
    await wait_ftj(kube, phase_is("Validating"), name="after")
    assert await kube.get("batch/v1", "Job", NS, "gone-validate") is None
    assert await kube.get("batch/v1", "Job", NS, "gone-train") is None
    assert await kube.get(API, "FineTuneJob", NS, "gone") is None


async def test_ttl_after_finished_deletes_the_finetunejob(kube, operator):
    await kube.create(ftj("ttl", ttlSecondsAfterFinished=1))
    await validated_and_training(kube, "ttl")
    await finish_job(kube, NS, "ttl-train", message={"outcome": "succeeded", "artifact": ARTIFACT})
    await wait_for(lambda: _ftj_absent(kube, "ttl"), what="FineTuneJob deleted by TTL")


async def _ftj_absent(kube, name: str) -> bool:
    return await kube.get(API, "FineTuneJob", NS, name) is None


async def test_operator_restart_mid_way_creates_no_duplicates(kube, kube_api):
    with start_operator(kube_api):
        await kube.create(ftj("re"))
        vjob = await wait_job(kube, "re-validate")
        await wait_ftj(kube, phase_is("Validating"), name="re")
    before = await get_ftj(kube, "re")
    # While the operator is down, the validation finishes.
    await finish_job(kube, NS, "re-validate", message=DATA_OK)
    with start_operator(kube_api):
        tjob = await wait_job(kube, "re-train")
        await wait_ftj(
            kube, lambda o: condition(o, c.DATA_VALIDATED)["status"] == "True", name="re"
        )
    with start_operator(kube_api):
        # Replayed ADDED events for everything: the same children, nothing new.
        await wait_ftj(kube, lambda o: o["metadata"]["resourceVersion"] != "", name="re")
        again = await get_ftj(kube, "re")
    assert (await kube.get("batch/v1", "Job", NS, "re-validate"))["metadata"]["uid"] == vjob[
        "metadata"
    ]["uid"]
    assert (await kube.get("batch/v1", "Job", NS, "re-train"))["metadata"]["uid"] == tjob[
        "metadata"
    ]["uid"]
    assert (
        again["status"]["restarts"] == 0 and before["metadata"]["uid"] == again["metadata"]["uid"]
    )
    jobs = [
        j["metadata"]["name"]
        for j in await kube.list("batch/v1", "Job", NS)
        if j["metadata"]["name"].startswith("re-")
    ]
    assert sorted(jobs) == ["re-train", "re-validate"]


# --- placement: multi-node, Kueue, unschedulable ----------------------------------------------


async def test_multi_node_kueue_job_is_indexed_with_headless_service_and_waits_for_admission(
    kube, operator
):
    await kube.create(ftj("multi", nodes=2, resources={"gpus": 8}, queueName="gpu-queue"))
    tjob = await validated_and_training(kube, "multi")
    assert tjob["spec"]["completionMode"] == "Indexed" and tjob["spec"]["completions"] == 2
    assert tjob["spec"]["suspend"] is True
    assert tjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert tjob["spec"]["template"]["spec"]["subdomain"] == "multi-train"
    svc = await kube.get("v1", "Service", NS, "multi-train")
    assert svc is not None and svc["spec"]["clusterIP"] == "None"
    assert env_of(tjob)["MASTER_ADDR"] == "multi-train-0.multi-train.default.svc"
    obj = await wait_ftj(
        kube, lambda o: "Kueue" in (o["status"].get("message") or ""), name="multi"
    )
    assert condition(obj, c.TRAINING)["status"] == "False"
    # Kueue admits the workload: it unsuspends the Job, pods start.
    await kube.patch("batch/v1", "Job", NS, "multi-train", {"spec": {"suspend": False}})
    await start_job(kube, NS, "multi-train")
    await wait_ftj(kube, lambda o: condition(o, c.TRAINING)["status"] == "True", name="multi")


async def test_unschedulable_trainer_pod_surfaces_the_schedulers_message(kube, operator):
    await kube.create(ftj("pend"))
    await validated_and_training(kube, "pend")
    msg = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available"
    await set_pod_unschedulable(kube, NS, "pend-train", msg)
    obj = await wait_ftj(
        kube,
        lambda o: condition(o, c.TRAINING)["reason"] == c.Reason.INSUFFICIENT_GPUS,
        name="pend",
    )
    assert msg in condition(obj, c.TRAINING)["message"] and msg in obj["status"]["message"]
    assert obj["status"]["phase"] == "Running"
    assert not obj["metadata"].get("finalizers")  # on.event handlers only: deletable without us
