"""kubetune.storage under injected S3 faults (the fault proxy from tests/plugins/s3.py).

Covers: the proxy itself injects 503s and forwards the rest faithfully; with about a sixth of requests
answered 503 SlowDown every store operation (put/get/list/head/delete, multipart upload,
parallel directory transfer, manifest verification) still succeeds; a GET body cut off halfway
is resumed with a Range request and yields the exact bytes; when every request fails the error
is a StorageError naming the URI (after bounded retries, not a hang).
"""

from __future__ import annotations

import os

import boto3
import pytest
from botocore.config import Config

from kubetune.api.common import StorageConfig
from kubetune.storage import StorageError, open_store
from kubetune.storage import s3 as s3mod
from kubetune.storage.manifests import verify_prefix, write_manifest


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    """Keep kubetune's own backoff short (botocore's is its own and stays as shipped)."""
    monkeypatch.setattr(s3mod, "BACKOFF_BASE_SECONDS", 0.01)


def test_proxy_injects_503_and_forwards_the_rest(s3_bucket, fault_proxy):
    proxy = fault_proxy(error_rate=0.5, seed=1)
    raw = boto3.client("s3", endpoint_url=proxy.endpoint, region_name="us-east-1",
                       config=Config(retries={"mode": "standard", "total_max_attempts": 1}))
    codes = []
    for i in range(16):
        try:
            raw.put_object(Bucket=s3_bucket, Key=f"k{i}", Body=b"v")
            codes.append(200)
        except raw.exceptions.ClientError as exc:
            codes.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    assert set(codes) == {200, 503}
    assert proxy.faults == codes.count(503)


def test_operations_survive_a_sixth_of_requests_failing(s3_bucket, fault_proxy, tmp_path):
    proxy = fault_proxy(error_rate=0.16, seed=7)
    store = open_store(f"s3://{s3_bucket}/flaky", StorageConfig(endpoint=proxy.endpoint))
    for i in range(6):
        store.write_json(f"obj/{i}.json", {"i": i})
    assert [store.read_json(f"obj/{i}.json")["i"] for i in range(6)] == list(range(6))
    assert len(store.list("obj/")) == 6
    assert store.exists("obj/3.json") and not store.exists("obj/33.json")
    src = tmp_path / "ckpt"
    src.mkdir()
    for i in range(5):
        (src / f"part{i}.bin").write_bytes(os.urandom(4096))
    write_manifest(src, {"step": 1})
    store.upload_dir(src, "ckpt")
    verify_prefix(store, "ckpt")
    store.download_dir("ckpt", tmp_path / "back")
    assert store.delete_prefix("obj/") == 6
    assert proxy.faults >= 3, "the proxy should really have failed some requests"


def test_multipart_upload_survives_faults(s3_bucket, fault_proxy, tmp_path):
    proxy = fault_proxy(error_rate=0.15, seed=3)
    store = open_store(f"s3://{s3_bucket}/mp", StorageConfig(endpoint=proxy.endpoint))
    store.transfer.multipart_threshold = store.transfer.multipart_chunksize = 5 * 1024 * 1024
    payload = os.urandom(16 * 1024 * 1024)
    (tmp_path / "w.bin").write_bytes(payload)
    store.upload_file(tmp_path / "w.bin", "w.bin")
    store.download_file("w.bin", tmp_path / "w2.bin")
    assert (tmp_path / "w2.bin").read_bytes() == payload


def test_streaming_read_resumes_after_a_dropped_connection(s3_bucket, s3_storage, fault_proxy):
    open_store(f"s3://{s3_bucket}", s3_storage).write_bytes("blob", payload := os.urandom(300_000))
    proxy = fault_proxy(error_rate=0.0, truncate_rate=0.5, seed=2)
    store = open_store(f"s3://{s3_bucket}", StorageConfig(endpoint=proxy.endpoint))
    for _ in range(4):
        assert store.read_bytes("blob") == payload
    assert proxy.truncations > 0, "some bodies should really have been cut off"


def test_persistent_failure_is_a_storage_error_naming_the_uri(s3_bucket, fault_proxy, monkeypatch):
    proxy = fault_proxy(error_rate=0.999, seed=0)
    store = open_store(f"s3://{s3_bucket}/down", StorageConfig(endpoint=proxy.endpoint))
    # Fewer attempts on both levels so the test is quick; the behaviour is the same.
    store.client = s3mod.make_client(StorageConfig(endpoint=proxy.endpoint), max_attempts=2)
    store.attempts = 2
    with pytest.raises(StorageError, match=f"s3://{s3_bucket}/down/k"):
        store.write_bytes("k", b"v")
    assert proxy.faults >= 4
