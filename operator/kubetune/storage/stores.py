"""The Store interface, its errors, and ``open_store`` (dispatch on the URI scheme).

One small class per backend (:mod:`kubetune.storage.s3`, :mod:`kubetune.storage.files`); the
shared logic (key checks, JSON/text helpers, directory walks with ``manifest.json`` last) lives
here so that both backends behave the same.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kubetune.api.common import StorageConfig

# Written last by upload_dir (and by write_manifest): its presence proves the rest is complete.
MANIFEST_NAME = "manifest.json"
DEFAULT_WORKERS = 8


class StorageError(Exception):
    """An object-store operation failed; the message names the URI and the cause."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The object does not exist."""


def open_store(uri: str, storage: StorageConfig | dict[str, Any] | None = None) -> Store:
    """A :class:`Store` rooted at ``uri`` (``s3://bucket/prefix`` or ``file:///path``).

    ``storage`` (a StorageConfig or its wire dict) gives the S3 endpoint and region; unset fields
    fall back to ``AWS_ENDPOINT_URL`` / ``AWS_REGION``. It is ignored for ``file://``.
    """
    if isinstance(storage, dict):
        storage = StorageConfig.model_validate(storage)
    parsed = urlparse(uri)
    match parsed.scheme:
        case "s3":
            # NB: imported here so that file:// users (the local runtime's CLI) never load boto3.
            from kubetune.storage.s3 import S3Store

            if not parsed.netloc:
                raise StorageError(f"{uri!r}: an s3:// URI needs a bucket (s3://bucket/prefix)")
            return S3Store(parsed.netloc, parsed.path.strip("/"), storage or StorageConfig())
        case "file":
            from kubetune.storage.files import FileStore

            if parsed.netloc not in ("", "localhost"):
                raise StorageError(f"{uri!r}: a file URI must be absolute: file:///path (three slashes)")
            if not parsed.path.startswith("/"):
                raise StorageError(f"{uri!r}: a file URI must be absolute: file:///path")
            return FileStore(Path(parsed.path))
        case other:
            raise StorageError(
                f"{uri!r}: unsupported scheme {other or '(none)'!r}; use s3://bucket/prefix or file:///path"
            )


def check_key(key: str, *, allow_empty: bool = False) -> str:
    """Normalise a relative key; refuse absolute keys and ``..`` (they would escape the root)."""
    if not isinstance(key, str):
        raise StorageError(f"key must be a string, got {type(key).__name__}")
    stripped = key.strip("/")
    parts = [p for p in stripped.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StorageError(f"key {key!r} may not contain '..'")
    if not parts and not allow_empty:
        raise StorageError("key must not be empty")
    return "/".join(parts)


def join_key(*parts: str) -> str:
    """Join key segments with single slashes, dropping empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def local_files(local_dir: str | os.PathLike[str]) -> list[str]:
    """Relative posix paths of every file under ``local_dir``, sorted."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"{root}: not a directory")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def manifest_last(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split names into (everything else, manifests): manifests are transferred after the rest."""
    first, last = [], []
    for name in names:
        (last if name.rsplit("/", 1)[-1] == MANIFEST_NAME else first).append(name)
    return first, last


class Store(ABC):
    """An object store rooted at a URI. Keys are relative, ``/``-separated."""

    #: The root URI (no trailing slash).
    uri: str
    workers: int = DEFAULT_WORKERS

    # --- backend primitives --------------------------------------------------------------

    @abstractmethod
    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object's bytes; raises ObjectNotFound when it does not exist."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write a whole object (replacing it; atomic for readers)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys (relative to the root) that start with ``prefix``, recursively."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; a missing object is not an error."""

    @abstractmethod
    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        """Copy a local file to ``key``."""

    @abstractmethod
    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Copy ``key`` to a local file (written to a temporary name, then renamed)."""

    @abstractmethod
    def child(self, prefix: str) -> Store:
        """A store of the same backend rooted at ``<root>/<prefix>``."""

    # --- shared conveniences -------------------------------------------------------------

    def uri_for(self, key: str = "") -> str:
        """The full URI of ``key`` (the root itself when empty)."""
        key = check_key(key, allow_empty=True)
        return f"{self.uri}/{key}" if key else self.uri

    def read_bytes(self, key: str) -> bytes:
        """An object's bytes."""
        return b"".join(self.iter_chunks(key))

    def read_text(self, key: str) -> str:
        """An object decoded as UTF-8."""
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        """Write UTF-8 text."""
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        """Parse an object as JSON; a parse error names the URI."""
        data = self.read_bytes(key)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise StorageError(f"{self.uri_for(key)}: not valid JSON: {exc}") from exc

    def write_json(self, key: str, value: Any) -> None:
        """Write ``value`` as indented JSON."""
        self.write_text(key, json.dumps(value, indent=2, sort_keys=True) + "\n")

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix``; returns how many were deleted."""
        keys = self.list(prefix)
        for key in keys:
            self.delete(key)
        return len(keys)

    def upload_dir(
        self, local_dir: str | os.PathLike[str], prefix: str = "", *, workers: int | None = None
    ) -> list[str]:
        """Upload every file under ``local_dir`` to ``prefix/`` in parallel; returns the keys (in order).

        Any ``manifest.json`` is uploaded only after every other file has landed, so a reader
        that sees the manifest can trust the rest is there (the checkpoint contract).
        """
        names = local_files(local_dir)
        first, last = manifest_last(names)
        root = Path(local_dir)
        for batch in (first, last):
            self._parallel(
                lambda name: self.upload_file(root / name, join_key(prefix, name)), batch, workers
            )
        return [join_key(prefix, n) for n in first + last]

    def download_dir(
        self, prefix: str, local_dir: str | os.PathLike[str], *, workers: int | None = None
    ) -> list[str]:
        """Download every object under ``prefix/`` into ``local_dir`` in parallel.

        Returns the relative paths written, in transfer order. ``manifest.json`` comes last, so a local folder with a
        manifest is as complete as the remote one was. Raises ObjectNotFound when nothing is there.
        """
        prefix = check_key(prefix, allow_empty=True)
        base = f"{prefix}/" if prefix else ""
        keys = [k for k in self.list(base) if k != prefix]
        if not keys:
            raise ObjectNotFound(f"{self.uri_for(prefix)}: no objects under this prefix")
        rel = [k[len(base):] for k in keys]
        first, last = manifest_last(rel)
        root = Path(local_dir)
        for batch in (first, last):
            self._parallel(lambda name: self.download_file(base + name, root / name), batch, workers)
        return first + last

    def _parallel(self, fn, items: list[str], workers: int | None) -> None:
        """Run ``fn`` over ``items`` on a thread pool; the first failure is raised."""
        if not items:
            return
        n = min(workers or self.workers, len(items))
        if n <= 1:
            for item in items:
                fn(item)
            return
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="kubetune-storage") as pool:
            # list() re-raises the first exception in submission order.
            list(pool.map(fn, items))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"
