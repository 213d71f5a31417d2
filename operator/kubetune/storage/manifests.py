"""``manifest.json``: the proof that a checkpoint or artifact folder is complete and intact.

Layout (written by :func:`write_manifest`, LAST, after every file it lists)::

    {"version": 1,
     "files": [{"path": "adapter_model.safetensors", "sha256": "<hex>", "size": 1234}, ...],
     ...extra fields (step, metrics, kind) given by the writer}

The manifest's own digest (:func:`manifest_digest`) is ``sha256:`` + the sha256 of its canonical
JSON (sorted keys, two-space indent, trailing newline); the file is written in exactly that form,
so the digest also equals the sha256 of the ``manifest.json`` bytes. It names the whole folder:
the trainer publishes it as the artifact digest and the server exports it.

Verification reads the manifest and checks every listed file's size and sha256, locally
(:func:`verify_dir`) or straight from a store prefix (:func:`verify_prefix`, streaming). Files the
manifest does not list are ignored (a later writer may add e.g. a README).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from kubetune.storage.files import atomic_write
from kubetune.storage.stores import MANIFEST_NAME, ObjectNotFound, StorageError, Store, join_key

MANIFEST_VERSION = 1
_CHUNK = 1 << 20


class ManifestError(StorageError):
    """A manifest is missing, malformed, or does not match the files."""


def canonical_json(manifest: dict[str, Any]) -> bytes:
    """The exact bytes a manifest is written as (and digested from)."""
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the manifest's canonical JSON."""
    return "sha256:" + hashlib.sha256(canonical_json(manifest)).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(local_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of every file under ``local_dir`` (any existing manifest.json left out)."""
    root = Path(local_dir)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a directory")
    files = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files.append({"path": rel, "sha256": sha256_file(path), "size": path.stat().st_size})
    return manifest_of(files, extra)


def manifest_of(files: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A manifest of ``files`` (``{path, sha256, size}`` entries, kept in the given order).

    Also for entries gathered elsewhere: a sharded checkpoint's processes each hash the files
    they wrote; two entries with one path would make the manifest lie, so they are refused.
    """
    paths = [f["path"] for f in files]
    if len(set(paths)) != len(paths):
        dupes = sorted({p for p in paths if paths.count(p) > 1})
        raise ManifestError(f"two writers claim the same files: {dupes}")
    extra = dict(extra or {})
    clash = {"version", "files"} & extra.keys()
    if clash:
        raise ManifestError(f"extra manifest fields may not override {sorted(clash)}")
    return {**extra, "version": MANIFEST_VERSION, "files": list(files)}


def write_manifest(local_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file under ``local_dir`` and write ``manifest.json`` there (atomically, last).

    Returns the manifest; :func:`manifest_digest` of it equals the sha256 of the written file.
    """
    manifest = build_manifest(local_dir, extra)
    atomic_write(Path(local_dir) / MANIFEST_NAME, canonical_json(manifest))
    return manifest


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and shape-check manifest bytes; errors name ``where``."""
    try:
        manifest = json.loads(data)
    except ValueError as exc:
        raise ManifestError(f"{where}: manifest is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise ManifestError(f"{where}: manifest has no 'files' list")
    for i, entry in enumerate(manifest["files"]):
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str)
                and isinstance(entry.get("sha256"), str)):
            raise ManifestError(f"{where}: files[{i}] needs 'path' and 'sha256'")
        if entry["path"].startswith("/") or ".." in entry["path"].split("/"):
            raise ManifestError(f"{where}: files[{i}].path {entry['path']!r} escapes the folder")
    return manifest


def read_manifest(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a local folder; ManifestError when missing or malformed."""
    path = Path(local_dir) / MANIFEST_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest (the folder is incomplete)") from exc
    return parse_manifest(data, str(path))


def load_manifest(store: Store, prefix: str = "") -> dict[str, Any] | None:
    """The manifest under a store prefix, or None when there is none (an incomplete folder)."""
    key = join_key(prefix, MANIFEST_NAME)
    try:
        data = store.read_bytes(key)
    except ObjectNotFound:
        return None
    return parse_manifest(data, store.uri_for(key))


def verify_dir(local_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every file the local manifest lists; returns the manifest or raises ManifestError."""
    root = Path(local_dir)
    manifest = read_manifest(root)
    problems = []
    for entry in manifest["files"]:
        path = root / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif "size" in entry and path.stat().st_size != entry["size"]:
            problems.append(f"{entry['path']}: size {path.stat().st_size} != {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 mismatch")
    if problems:
        raise ManifestError(f"{root}: manifest does not verify: " + "; ".join(problems))
    return manifest


def verify_prefix(store: Store, prefix: str = "") -> dict[str, Any]:
    """Check every listed file under a store prefix by streaming it; returns the manifest."""
    manifest = load_manifest(store, prefix)
    where = store.uri_for(prefix)
    if manifest is None:
        raise ManifestError(f"{where}: no manifest.json (the folder is incomplete)")
    problems = []
    for entry in manifest["files"]:
        h, size = hashlib.sha256(), 0
        try:
            for chunk in store.iter_chunks(join_key(prefix, entry["path"])):
                h.update(chunk)
                size += len(chunk)
        except ObjectNotFound:
            problems.append(f"{entry['path']}: missing")
            continue
        if "size" in entry and size != entry["size"]:
            problems.append(f"{entry['path']}: size {size} != {entry['size']}")
        elif h.hexdigest() != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 mismatch")
    if problems:
        raise ManifestError(f"{where}: manifest does not verify: " + "; ".join(problems))
    return manifest
