"""The kmock harness itself: server-set metadata, /status isolation, GC, request log, operator start.

Covers what tests/plugins/kube.py promises on top of kmock, so that the reconciler tests can rely
on it: uid/resourceVersion/generation on create and update, a patch to the object never changes
status (and /status changes nothing else), ownerReference garbage collection, the session
request log, and the real operator starting and stopping cleanly against the emulator.
"""

from __future__ import annotations

from tests.plugins.kube import REQUEST_LOG, start_operator

FTJ = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "smoke", "namespace": "default"},
    "spec": {
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/smoke"},
    },
}


async def test_create_sets_uid_resource_version_and_generation(kube):
    obj, created = await kube.create(FTJ)
    assert created
    meta = obj["metadata"]
    assert meta["uid"] and meta["resourceVersion"] and meta["generation"] == 1
    again, created_again = await kube.create(FTJ)
    assert not created_again and again["metadata"]["uid"] == meta["uid"]


async def test_spec_patch_bumps_generation_and_status_is_isolated(kube):
    obj, _ = await kube.create(FTJ)
    patched = await kube.patch("kubetune.io/v1alpha1", "FineTuneJob", "default", "smoke",
                               {"spec": {"suspend": True}, "status": {"phase": "Hacked"}})
    assert patched["metadata"]["generation"] == 2
    assert "status" not in patched
    assert int(patched["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])
    st = await kube.patch("kubetune.io/v1alpha1", "FineTuneJob", "default", "smoke",
                          {"spec": {"suspend": False}, "status": {"phase": "Running"}}, subresource="status")
    assert st["status"]["phase"] == "Running" and st["spec"]["suspend"] is True
    assert st["metadata"]["generation"] == 2


async def test_deleting_an_owner_garbage_collects_its_children(kube):
    owner, _ = await kube.create(FTJ)
    ref = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "smoke",
           "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    job, _ = await kube.create({"apiVersion": "batch/v1", "kind": "Job",
                                "metadata": {"name": "smoke-train", "namespace": "default", "ownerReferences": [ref]},
                                "spec": {"template": {"spec": {"containers": []}}}})
    await kube.create({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": "smoke-train-0", "namespace": "default", "ownerReferences": [
                           {"apiVersion": "batch/v1", "kind": "Job", "name": "smoke-train", "uid": job["metadata"]["uid"]}]},
                       "spec": {"containers": []}})
    assert await kube.delete("kubetune.io/v1alpha1", "FineTuneJob", "default", "smoke")
    assert await kube.get("batch/v1", "Job", "default", "smoke-train") is None
    assert await kube.get("v1", "Pod", "default", "smoke-train-0") is None


async def test_requests_are_logged_for_the_session(kube):
    await kube.get("batch/v1", "Job", "default", "nope")
    assert ("GET", "/apis/batch/v1/namespaces/default/jobs/nope") in REQUEST_LOG


def test_operator_starts_and_stops_cleanly(kube_api):
    with start_operator(kube_api) as runner:
        pass
    assert runner.exception is None
    assert runner.exit_code == 0
