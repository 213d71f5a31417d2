"""``file:///path`` backend for the local runtime: a folder plays the bucket.

Writes go to a temporary file in the same folder and are renamed into place, so a reader (or a
crash) never sees half an object — the same guarantee an S3 PUT gives.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kubetune.storage.stores import ObjectNotFound, StorageError, Store, check_key


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary sibling and a rename."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileStore(Store):
    """A store rooted at a local folder (which need not exist yet)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.uri = "file://" + self.root.as_posix().rstrip("/") if str(self.root) != "/" else "file:///"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def child(self, prefix: str) -> FileStore:
        """A store rooted at ``<root>/<prefix>``."""
        return FileStore(self.root / check_key(prefix, allow_empty=True))

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream a file's bytes."""
        path = self._path(key)
        try:
            fh = open(path, "rb")  # noqa: SIM115 (closed by the with below, inside the generator)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(f"{self.uri_for(key)}: no such object") from exc
        return self._chunks(fh, chunk_size)

    @staticmethod
    def _chunks(fh, chunk_size: int) -> Iterator[bytes]:
        with fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically (tmp + rename)."""
        try:
            atomic_write(self._path(key), bytes(data))
        except OSError as exc:
            raise StorageError(f"{self.uri_for(key)}: write failed: {exc}") from exc

    def exists(self, key: str) -> bool:
        """Whether the file exists."""
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative keys starting with ``prefix`` (temporary files left out)."""
        prefix = prefix.lstrip("/")
        # Walk only the deepest folder the prefix names fully; filter the rest by string prefix,
        # as S3 does ("step-1" matches "step-1/..." and "step-10/...").
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / check_key(folder, allow_empty=True)
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    continue
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel.startswith(prefix):
                    keys.append(rel)
        return sorted(keys)

    def delete(self, key: str) -> None:
        """Remove the file (and folders left empty up to the root)."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.root and parent.is_relative_to(self.root):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        """Copy a local file in atomically."""
        src = Path(local_path)
        if not src.is_file():
            raise StorageError(f"{src}: no such local file to upload to {self.uri_for(key)}")
        atomic_copy(src, self._path(key))

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Copy a file out atomically."""
        src = self._path(key)
        if not src.is_file():
            raise ObjectNotFound(f"{self.uri_for(key)}: no such object")
        atomic_copy(src, Path(local_path))
