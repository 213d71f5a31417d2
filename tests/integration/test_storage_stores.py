"""kubetune.storage against both backends: a folder (file://) and moto's S3 server (s3://).

Covers, for each backend: bytes/text/JSON round trips, exists/list/delete, string-prefix listing,
keys that try to escape the root, missing objects (ObjectNotFound, a FileNotFoundError), file
and directory transfers (multipart above the threshold, manifest.json transferred last),
child stores, manifests verified straight from a prefix, and the scheme dispatch of open_store
(StorageConfig vs environment). The S3 retry path is covered in test_storage_faults.py.
"""

from __future__ import annotations

import os

import pytest

from kubetune.api.common import StorageConfig
from kubetune.storage import ObjectNotFound, StorageError, open_store
from kubetune.storage import s3 as s3mod
from kubetune.storage.manifests import ManifestError, verify_prefix, write_manifest


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    """A fresh, empty store of each backend."""
    if request.param == "file":
        return open_store(f"file://{tmp_path}/store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/root/prefix")


def test_bytes_text_json_round_trip(store):
    store.write_bytes("a/b.bin", b"\x00\x01binary")
    store.write_text("t.txt", "héllo")
    store.write_json("c/d.json", {"step": 3})
    assert store.read_bytes("a/b.bin") == b"\x00\x01binary"
    assert store.read_text("t.txt") == "héllo"
    assert store.read_json("c/d.json") == {"step": 3}


def test_overwrite_replaces_the_object(store):
    store.write_bytes("k", b"one")
    store.write_bytes("k", b"two")
    assert store.read_bytes("k") == b"two"
    assert store.list() == ["k"]


def test_exists_list_and_delete(store):
    for key in ("step-1/x", "step-10/y", "step-2/z", "other"):
        store.write_bytes(key, b"1")
    assert store.exists("step-1/x") and not store.exists("step-1/nope")
    assert store.list() == ["other", "step-1/x", "step-10/y", "step-2/z"]
    # A string prefix, as in S3: "step-1" also matches "step-10".
    assert store.list("step-1") == ["step-1/x", "step-10/y"]
    assert store.list("step-1/") == ["step-1/x"]
    assert store.list("nothing/") == []
    store.delete("other")
    store.delete("other")  # deleting a missing object is fine
    assert not store.exists("other")
    assert store.delete_prefix("step-1") == 2
    assert store.list() == ["step-2/z"]


def test_missing_object_is_object_not_found(store):
    with pytest.raises(ObjectNotFound) as info:
        store.read_bytes("missing.json")
    assert isinstance(info.value, FileNotFoundError)
    assert store.uri_for("missing.json") in str(info.value)
    with pytest.raises(ObjectNotFound):
        store.download_file("missing.json", "/tmp/never-written-by-kubetune")


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "", "/"])
def test_keys_may_not_escape_or_be_empty(store, key):
    with pytest.raises(StorageError):
        store.write_bytes(key, b"x")


def test_read_json_names_the_uri_on_bad_json(store):
    store.write_bytes("bad.json", b"{nope")
    with pytest.raises(StorageError, match="bad.json: not valid JSON"):
        store.read_json("bad.json")


def test_file_transfers_round_trip(store, tmp_path, monkeypatch):
    # Lower the multipart threshold so the S3 path really uses a multipart upload.
    monkeypatch.setattr(s3mod, "MULTIPART_BYTES", 5 * 1024 * 1024)
    if hasattr(store, "transfer"):
        store.transfer.multipart_threshold = store.transfer.multipart_chunksize = 5 * 1024 * 1024
    src = tmp_path / "big.bin"
    payload = os.urandom(11 * 1024 * 1024 + 7)
    src.write_bytes(payload)
    store.upload_file(src, "weights/big.bin")
    dst = tmp_path / "out" / "copy.bin"
    store.download_file("weights/big.bin", dst)
    assert dst.read_bytes() == payload
    assert b"".join(store.iter_chunks("weights/big.bin", 1 << 20)) == payload
    # No temporary files are left next to the download.
    assert sorted(p.name for p in dst.parent.iterdir()) == ["copy.bin"]


def test_directory_round_trip_with_manifest_last(store, tmp_path):
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    for i in range(12):
        (src / f"f{i}.bin").write_bytes(os.urandom(1000 + i))
    (src / "sub" / "nested.txt").write_text("nested")
    manifest = write_manifest(src, {"step": 7})
    keys = store.upload_dir(src, "checkpoints/step-7")
    assert "checkpoints/step-7/manifest.json" in keys
    assert verify_prefix(store, "checkpoints/step-7") == manifest
    dst = tmp_path / "restored"
    rel = store.download_dir("checkpoints/step-7", dst)
    assert rel[-1] == "manifest.json"  # transferred after the files it lists
    for path in src.rglob("*"):
        if path.is_file():
            assert (dst / path.relative_to(src)).read_bytes() == path.read_bytes()


def test_download_dir_of_nothing_is_object_not_found(store, tmp_path):
    with pytest.raises(ObjectNotFound):
        store.download_dir("absent", tmp_path / "x")


def test_verify_prefix_catches_tampering_and_missing_manifest(store, tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "w.bin").write_bytes(b"weights")
    write_manifest(src)
    store.upload_dir(src, "model")
    store.write_bytes("model/w.bin", b"tampered")
    with pytest.raises(ManifestError, match="w.bin: size"):
        verify_prefix(store, "model")
    store.delete("model/manifest.json")
    with pytest.raises(ManifestError, match="no manifest.json"):
        verify_prefix(store, "model")


def test_child_store_shares_the_root(store):
    child = store.child("checkpoints/step-3")
    child.write_bytes("model.bin", b"m")
    assert child.uri == store.uri_for("checkpoints/step-3")
    assert store.read_bytes("checkpoints/step-3/model.bin") == b"m"
    assert child.list() == ["model.bin"]


# --- open_store dispatch --------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, message",
    [
        ("gs://bucket/x", "unsupported scheme 'gs'"),
        ("/plain/path", r"unsupported scheme '\(none\)'"),
        ("file://relative/path", "three slashes"),
        ("s3:///no-bucket", "needs a bucket"),
    ],
)
def test_open_store_refuses_bad_uris(uri, message):
    with pytest.raises(StorageError, match=message):
        open_store(uri)


def test_s3_endpoint_from_storage_config_beats_environment(s3_bucket, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    store = open_store(f"s3://{s3_bucket}/x", StorageConfig(endpoint=s3_endpoint, region="us-east-1"))
    store.write_bytes("k", b"v")
    assert store.read_bytes("k") == b"v"
    # The wire dict of a spec's storage works too.
    again = open_store(f"s3://{s3_bucket}/x", {"endpoint": s3_endpoint})
    assert again.read_bytes("k") == b"v"


def test_s3_endpoint_from_environment(s3_bucket):
    store = open_store(f"s3://{s3_bucket}")
    assert store.uri == f"s3://{s3_bucket}"
    store.write_bytes("top.txt", b"1")
    assert store.list() == ["top.txt"]


def test_s3_missing_bucket_is_a_clear_error(s3_env):
    with pytest.raises(StorageError, match="no-such-bucket"):
        open_store("s3://no-such-bucket/x").list()
