"""The local runtime against an S3-compatible store (moto's server on loopback), not only file://.

Covers: a FineTuneJob whose output is ``s3://`` with ``spec.storage.endpoint`` and
``credentialsSecret`` runs locally when the Secret is applied with the manifests: the
container's ``secretKeyRef`` env resolves from the local Secret (the keys never appear in the
spec), the trainer publishes its artifact to the bucket, and status points at it.
"""

from __future__ import annotations

import asyncio

import boto3
import pytest

from kubetune.local.demo import DemoSettings, finetunejob
from kubetune.local.runtime import build_runtime
from kubetune.local.store import Store

pytestmark = pytest.mark.slow


def test_finetunejob_publishes_to_s3_with_a_locally_applied_secret(
    tmp_path, demo_assets, s3_endpoint, s3_bucket
):
    paths = {"base": demo_assets / "models" / "base", "train": demo_assets / "data" / "train.jsonl"}
    ftj = finetunejob("to-s3", tmp_path, paths, steps=4, settings=DemoSettings.fast(), seed=1)
    ftj["spec"]["output"] = {"uri": f"s3://{s3_bucket}/runs/to-s3"}
    ftj["spec"]["storage"] = {
        "endpoint": s3_endpoint,
        "region": "us-east-1",
        "credentialsSecret": "s3-keys",
    }
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3-keys"},
        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
    }
    store = Store(tmp_path / "state")
    store.apply(secret)
    store.apply(ftj)

    async def scenario():
        runtime = build_runtime(store)
        await runtime.start()
        try:
            return await runtime.run(until=runtime.settled, timeout=240)
        finally:
            await runtime.stop()

    assert asyncio.run(scenario())
    status = store.get("FineTuneJob", "to-s3")["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["artifact"]["uri"].startswith(f"s3://{s3_bucket}/runs/to-s3/model")
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    keys = {
        o["Key"]
        for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="runs/to-s3/model/")["Contents"]
    }
    assert "runs/to-s3/model/manifest.json" in keys
    # The keys came from the Secret, never from the spec the builders serialised into the Job.
    job = store.get_child("Job", "to-s3-train")
    assert "testing" not in str(job["spec"]["template"]["spec"]["containers"][0]["env"])
