"""Getting inputs: single objects by URI and model folders (local path for file://, download for s3://)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubetune.storage import ObjectNotFound, Store, open_store
from kubetune.storage.manifests import MANIFEST_NAME, load_manifest, manifest_digest

log = logging.getLogger("kubetune_trainer.sources")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "config.json",
    "generation_config.json",
)


def split_uri(uri: str) -> tuple[str, str]:
    """``(parent_uri, name)`` of an object URI."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    if not name or parent.endswith(":/") or parent.endswith(":"):
        raise ObjectNotFound(f"{uri!r} does not name an object")
    return parent, name


def read_object(uri: str, storage: Any = None) -> bytes:
    """The bytes of one object (``s3://bucket/key`` or ``file:///path``)."""
    parent, name = split_uri(uri)
    return open_store(parent, storage).read_bytes(name)


def local_path(uri: str) -> Path | None:
    """The local folder behind a file:// URI (None for other schemes)."""
    parsed = urlparse(uri)
    return Path(parsed.path) if parsed.scheme == "file" else None


def fetch_model(uri: str, storage: Any, work_dir: Path, *, tokenizer_only: bool = False) -> Path:
    """A local folder holding the model at ``uri`` (downloaded into ``work_dir`` for s3://)."""
    path = local_path(uri)
    if path is not None:
        if not path.is_dir():
            raise ObjectNotFound(f"{uri}: base model folder does not exist")
        return path
    store = open_store(uri, storage)
    target = work_dir / ("tokenizer" if tokenizer_only else "base-model")
    done = target / ".kubetune-complete"
    if done.exists():
        # Another process of this pod downloaded it already (torchrun: local rank 0 first).
        return target
    if tokenizer_only:
        keys = [k for k in store.list("") if k in TOKENIZER_FILES]
        if not keys:
            raise ObjectNotFound(
                f"{uri}: no tokenizer files (tokenizer.json, tokenizer_config.json, ...)"
            )
        for key in keys:
            store.download_file(key, target / key)
    else:
        store.download_dir("", target)
    done.touch()
    return target


def model_digest(uri: str, storage: Any, folder: Path) -> str:
    """Digest of a model folder: its manifest's digest when it has one, else a tree digest.

    The tree digest is sha256 over ``path\\0sha256\\n`` lines of every file, sorted (git-like:
    the same bytes under the same names give the same digest wherever they are stored).
    """
    try:
        manifest = load_manifest(open_store(uri, storage)) if local_path(uri) is None else None
    except Exception:  # noqa: BLE001 (no manifest: fall back to hashing the files)
        manifest = None
    if manifest is None and (folder / MANIFEST_NAME).is_file():
        from kubetune.storage.manifests import read_manifest

        manifest = read_manifest(folder)
    if manifest is not None:
        return manifest_digest(manifest)
    return tree_digest(folder)


def tree_digest(folder: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> str:
    """``sha256:`` over the sorted ``path\\0sha256`` lines of every file under ``folder``."""
    from kubetune.storage.manifests import sha256_file

    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        h.update(f"{rel}\0{sha256_file(path)}\n".encode())
    return "sha256:" + h.hexdigest()


def output_store(uri: str, storage: Any) -> Store:
    """The store rooted at ``spec.output.uri``."""
    return open_store(uri, storage)
