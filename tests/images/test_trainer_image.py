"""The trainer image run with the Jobs' own pod specs (build_validate_job, build_train_job).

Covers, with the tiny model and the demo dataset in moto's S3 (keys from the pod's Secret
references), as UID 10001 on a read-only root with every capability dropped:
- ``validate`` succeeds and writes its data report next to the output;
- ``train`` writes verifiable checkpoints and the artifact (model, manifest, lineage) to S3 and
  says so in its termination message;
- SIGTERM in the middle of a long run writes a verifiable checkpoint and exits 143 within the
  Job's grace period (``outcome: preempted`` in the termination message).
"""

from __future__ import annotations

import json
import time

import pytest

from kubetune.finetune import builders as ftb
from kubetune.storage.manifests import load_manifest, verify_prefix
from kubetune.storage.stores import open_store
from tests.images.conftest import Pod, image_finetunejob, s3_client

pytestmark = pytest.mark.images


def _store(ftj):
    """The job's output prefix (the keys come from the ``s3_env`` fixture's environment)."""
    storage = {k: v for k, v in ftj["spec"]["storage"].items() if k != "credentialsSecret"}
    return open_store(ftj["spec"]["output"]["uri"], storage)


def test_validate_succeeds_under_the_validate_jobs_pod_spec(trained_artifact):
    pod = trained_artifact.validate
    assert pod.exit_code == 0, pod.log()[-4000:]
    assert pod.termination_message().get("outcome") == "succeeded", pod.termination_message()
    # The pod ran as the image's user on a read-only root: proven by the arguments podman got.
    assert "--read-only" in pod.run.args and "--cap-drop=ALL" in pod.run.args
    assert "--user" not in pod.run.args  # runAsNonRoot: the image's USER 10001 applies


def test_train_writes_checkpoints_and_the_artifact_to_s3(trained_artifact, image_assets, s3_env):
    pod = trained_artifact.train
    assert pod.exit_code == 0, pod.log()[-4000:]
    message = pod.termination_message()
    assert message.get("outcome") == "succeeded", message
    keys = {
        o["Key"]
        for o in s3_client(image_assets.endpoint).list_objects_v2(
            Bucket=image_assets.bucket, Prefix="runs/tiny/"
        )["Contents"]
    }
    # checkpoint.everySteps 4 of 8 steps: step 4 is a checkpoint, the end is the artifact.
    assert "runs/tiny/checkpoints/step-4/manifest.json" in keys, sorted(keys)
    assert "runs/tiny/model/manifest.json" in keys and "runs/tiny/model/lineage.json" in keys
    store = _store(trained_artifact.ftj)
    assert verify_prefix(store, "checkpoints/step-4")["step"] == 4
    assert message["step"] == 8
    verify_prefix(store, "model")
    lineage = store.read_json("model/lineage.json")
    assert lineage["baseModel"]["uri"] == image_assets.base_uri


def test_sigterm_writes_a_checkpoint_and_exits_143(
    built_images, image_assets, tmp_path, pods, s3_env
):
    ftj = image_finetunejob(
        "long",
        image_assets,
        steps=100000,
        checkpoint={"everySteps": 100000, "keepLast": 1},
        evaluation={"everySteps": 100000},
    )
    image = built_images["trainer"]
    # The progress channel as a file in the pod's /tmp emptyDir, read here from the host side.
    job = ftb.build_train_job(ftj, attempt=0, image=image, report="file:///tmp/progress.json")
    pod = Pod(job["spec"]["template"]["spec"], image, tmp_path / "pod")
    pods.append(pod)
    progress = pod.volume("tmp") / "progress.json"
    deadline = time.monotonic() + 300
    while True:
        assert pod.running(), pod.log()[-4000:]
        if progress.exists():
            step = json.loads(progress.read_text() or "{}").get("progress", {}).get("step", 0)
            if step >= 3:
                break
        assert time.monotonic() < deadline, f"no step 3 within 300 s:\n{pod.log()[-4000:]}"
        time.sleep(0.2)
    code, seconds = pod.stop()
    assert code == 143, pod.log()[-4000:]
    assert seconds < ftb.TRAIN_GRACE_SECONDS
    message = pod.termination_message()
    assert message["outcome"] == "preempted" and message["step"] >= 3, message
    manifest = verify_prefix(_store(ftj), f"checkpoints/step-{message['step']}")
    assert manifest["step"] == message["step"]
    assert load_manifest(_store(ftj), "model") is None  # no artifact from a preempted run
