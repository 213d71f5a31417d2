"""kubetune.storage.manifests on local folders.

Covers: every file hashed with size, manifest.json left out of itself, extra fields kept but
not allowed to override version/files, the digest equals the sha256 of the written bytes and
changes with any file, verify_dir catches a changed, truncated or missing file and a missing
or malformed manifest, paths escaping the folder are refused; and the file:// store's atomic
writes leave no temporary files behind.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from kubetune.storage import open_store
from kubetune.storage.manifests import (
    ManifestError,
    manifest_digest,
    verify_dir,
    write_manifest,
)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "model"
    (root / "tok").mkdir(parents=True)
    (root / "adapter.safetensors").write_bytes(b"weights" * 100)
    (root / "tok" / "tokenizer.json").write_text("{}")
    return root


def test_manifest_lists_every_file_with_sha256_and_size(folder):
    manifest = write_manifest(folder, {"step": 5, "metrics": {"loss": 0.5}})
    assert manifest["version"] == 1 and manifest["step"] == 5
    assert [f["path"] for f in manifest["files"]] == ["adapter.safetensors", "tok/tokenizer.json"]
    entry = manifest["files"][0]
    assert entry["sha256"] == hashlib.sha256(b"weights" * 100).hexdigest() and entry["size"] == 700
    # Rewriting does not list the old manifest as one of the files.
    assert write_manifest(folder, {"step": 5, "metrics": {"loss": 0.5}}) == manifest


def test_digest_is_sha256_of_the_written_file_and_tracks_content(folder):
    manifest = write_manifest(folder)
    data = (folder / "manifest.json").read_bytes()
    assert manifest_digest(manifest) == "sha256:" + hashlib.sha256(data).hexdigest()
    (folder / "adapter.safetensors").write_bytes(b"other")
    assert manifest_digest(write_manifest(folder)) != manifest_digest(manifest)


def test_extra_fields_may_not_override_structure(folder):
    with pytest.raises(ManifestError, match="files"):
        write_manifest(folder, {"files": []})


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "adapter.safetensors").write_bytes(b"x" * 700), "sha256 mismatch"),
        (lambda root: (root / "adapter.safetensors").write_bytes(b"short"), "size 5 != 700"),
        (lambda root: (root / "tok" / "tokenizer.json").unlink(), "tokenizer.json: missing"),
        (lambda root: (root / "manifest.json").unlink(), "no manifest"),
        (lambda root: (root / "manifest.json").write_text("{"), "not valid JSON"),
        (lambda root: (root / "manifest.json").write_text('{"files": [{"path": "../x", "sha256": "0"}]}'),
         "escapes the folder"),
    ],
)
def test_verify_dir_catches_damage(folder, damage, message):
    write_manifest(folder)
    verify_dir(folder)
    damage(folder)
    with pytest.raises(ManifestError, match=message):
        verify_dir(folder)


def test_unlisted_files_do_not_fail_verification(folder):
    write_manifest(folder)
    (folder / "README.md").write_text("added later")
    assert verify_dir(folder)["files"][0]["path"] == "adapter.safetensors"


def test_file_store_writes_are_atomic_and_leave_no_temporaries(tmp_path):
    store = open_store(f"file://{tmp_path}/s")
    for i in range(5):
        store.write_json("status.json", {"i": i})
    assert json.loads((tmp_path / "s" / "status.json").read_text()) == {"i": 4}
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["status.json"]


def test_manifest_of_gathered_entries_refuses_two_writers_of_one_path():
    from kubetune.storage.manifests import ManifestError, manifest_of

    entries = [{"path": "__0_0.distcp", "sha256": "a", "size": 1}, {"path": ".metadata", "sha256": "b", "size": 2}]
    assert manifest_of(entries, {"step": 3}) == {"step": 3, "version": 1, "files": entries}
    with pytest.raises(ManifestError, match="__0_0.distcp"):
        manifest_of([*entries, {"path": "__0_0.distcp", "sha256": "c", "size": 1}])
