"""``s3://bucket/prefix`` backend through boto3 (AWS S3, MinIO, Ceph, R2, moto).

Endpoint and region come from the StorageConfig, else from ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``. Credentials are never passed
here: boto3's default chain finds them in the environment (a Secret mapped to env by the pod
builder) or in the pod's workload identity (IRSA web-identity token, EKS Pod Identity, ...).

Retries happen on two levels, on purpose:

1. botocore's ``standard`` retry mode retries each HTTP request on 5xx, throttling and
   connection errors (``max_attempts`` requests per call, exponential backoff with jitter);
2. :func:`retrying` wraps each store operation for what botocore does not cover: a response body
   that breaks off mid-stream (``iter_chunks`` resumes at the byte offset it reached, pinned to
   the object's ETag), a multipart transfer whose part ran out of attempts, or a burst of
   failures longer than botocore's attempts.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import boto3
import botocore.exceptions as bexc
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from kubetune.api.common import StorageConfig
from kubetune.storage.stores import (
    DEFAULT_WORKERS,
    ObjectNotFound,
    StorageError,
    Store,
    check_key,
    join_key,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Per-request attempts inside botocore (standard mode) and whole-operation attempts around it.
BOTOCORE_MAX_ATTEMPTS = 8
OPERATION_ATTEMPTS = 5
BACKOFF_BASE_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 5.0
MULTIPART_BYTES = 16 * 1024 * 1024

# Error codes S3-compatible stores use for "slow down / try again".
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "TooManyRequestsException", "RequestTimeout", "RequestTimeoutException", "InternalError",
    "ServiceUnavailable", "PriorRequestNotComplete", "BandwidthLimitExceeded",
}
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _error_code(exc: bexc.ClientError) -> tuple[str, int]:
    err = exc.response.get("Error", {}) or {}
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    return str(err.get("Code", "")), int(status)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: 5xx, throttling, timeouts, dropped connections."""
    if isinstance(exc, bexc.ClientError):
        code, status = _error_code(exc)
        return status >= 500 or status == 429 or code in _TRANSIENT_CODES
    # Connection refused/reset, read timeouts, bodies cut short: all of botocore's transport errors.
    if isinstance(
        exc,
        bexc.HTTPClientError | bexc.ConnectionError | bexc.IncompleteReadError | http.client.HTTPException
        | ConnectionError | TimeoutError,
    ):
        return True
    # s3transfer gives up on a download with RetriesExceededError after its own attempts.
    return type(exc).__name__ == "RetriesExceededError"


def is_not_found(exc: BaseException) -> bool:
    """Whether ``exc`` says the object (or bucket) does not exist."""
    if isinstance(exc, bexc.ClientError):
        code, status = _error_code(exc)
        return status == 404 or code in _NOT_FOUND_CODES
    return False


def backoff_delay(attempt: int) -> float:
    """Full-jitter exponential backoff (AWS architecture blog): uniform in [0, base * 2^attempt]."""
    return random.uniform(0, min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * (2**attempt)))


def retrying(what: str, fn: Callable[[], T], attempts: int = OPERATION_ATTEMPTS) -> T:
    """Call ``fn`` until it succeeds, retrying transient failures; errors become StorageError."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 (classified below)
            if is_not_found(exc):
                raise ObjectNotFound(f"{what}: no such object") from exc
            if isinstance(exc, StorageError):
                raise
            if not is_transient(exc) or attempt == attempts - 1:
                raise StorageError(f"{what}: {exc}") from exc
            delay = backoff_delay(attempt)
            log.warning("%s: transient error (%s), retry %d in %.2fs", what, exc, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def make_client(storage: StorageConfig, *, max_attempts: int = BOTOCORE_MAX_ATTEMPTS, pool: int = 32):
    """A boto3 S3 client for ``storage`` (endpoint/region from it, else from the environment)."""
    endpoint = storage.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        region_name=region,
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=pool,
        # Path-style addressing: custom endpoints (MinIO, moto, Ceph) rarely have wildcard DNS.
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint or None, config=config)


class S3Store(Store):
    """A store rooted at ``s3://bucket/prefix``."""

    def __init__(self, bucket: str, prefix: str, storage: StorageConfig, *, client=None,
                 workers: int = DEFAULT_WORKERS, attempts: int = OPERATION_ATTEMPTS):
        self.bucket = bucket
        self.prefix = check_key(prefix, allow_empty=True)
        self.storage = storage
        self.workers = workers
        self.attempts = attempts
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or make_client(storage, pool=max(32, workers * 4))
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_BYTES,
            multipart_chunksize=MULTIPART_BYTES,
            max_concurrency=4,
            num_download_attempts=5,
        )

    def _key(self, key: str, *, allow_empty: bool = False) -> str:
        return join_key(self.prefix, check_key(key, allow_empty=allow_empty))

    def child(self, prefix: str) -> S3Store:
        """A store rooted deeper in the same bucket, sharing this one's client."""
        return S3Store(self.bucket, self._key(prefix, allow_empty=True), self.storage,
                       client=self.client, workers=self.workers, attempts=self.attempts)

    def _retry(self, key: str, fn: Callable[[], T]) -> T:
        return retrying(self.uri_for(key), fn, self.attempts)

    def iter_chunks(self, key: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Stream an object; a body cut short is resumed with a Range request at the same ETag."""
        full = self._key(key)
        first = self._retry(key, lambda: self.client.get_object(Bucket=self.bucket, Key=full))
        return self._stream(key, full, first, chunk_size)

    def _stream(self, key: str, full: str, response, chunk_size: int) -> Iterator[bytes]:
        etag = response.get("ETag")
        offset, failures = 0, 0
        while True:
            try:
                for chunk in response["Body"].iter_chunks(chunk_size):
                    offset += len(chunk)
                    yield chunk
                return
            except Exception as exc:  # noqa: BLE001 (classified below)
                failures += 1
                if not is_transient(exc) or failures >= self.attempts:
                    raise StorageError(f"{self.uri_for(key)}: read failed at byte {offset}: {exc}") from exc
                delay = backoff_delay(failures - 1)
                log.warning("%s: read broke off at byte %d (%s); resuming in %.2fs",
                            self.uri_for(key), offset, exc, delay)
                time.sleep(delay)
                kwargs = {"Bucket": self.bucket, "Key": full, "Range": f"bytes={offset}-"}
                if etag:
                    # NB: never stitch two versions of an object together.
                    kwargs["IfMatch"] = etag
                response = self._retry(key, lambda kw=kwargs: self.client.get_object(**kw))

    def write_bytes(self, key: str, data: bytes) -> None:
        """PUT a whole object (S3 PUTs are atomic for readers)."""
        full = self._key(key)
        self._retry(key, lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data)))

    def exists(self, key: str) -> bool:
        """HEAD the object."""
        full = self._key(key)
        try:
            self._retry(key, lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under ``prefix`` (relative to the root), all pages."""
        root = f"{self.prefix}/" if self.prefix else ""
        full = root + prefix.lstrip("/")

        def run() -> list[str]:
            keys = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(obj["Key"][len(root):] for obj in page.get("Contents", []))
            return keys

        try:
            return sorted(self._retry(prefix, run))
        except ObjectNotFound as exc:
            raise StorageError(f"s3://{self.bucket}: bucket does not exist") from exc

    def delete(self, key: str) -> None:
        """DELETE one object (S3 answers 204 for a missing one too)."""
        full = self._key(key)
        self._retry(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full))

    def delete_prefix(self, prefix: str) -> int:
        """Delete everything under ``prefix`` in batches of 1000 (DeleteObjects)."""
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]
            self._retry(prefix, lambda b=batch: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": b, "Quiet": True}))
        return len(keys)

    def upload_file(self, local_path: str | os.PathLike[str], key: str) -> None:
        """Upload a file (multipart above 16 MiB, parts in parallel)."""
        src = Path(local_path)
        if not src.is_file():
            raise StorageError(f"{src}: no such local file to upload to {self.uri_for(key)}")
        full = self._key(key)
        self._retry(key, lambda: self.client.upload_file(str(src), self.bucket, full, Config=self.transfer))

    def download_file(self, key: str, local_path: str | os.PathLike[str]) -> None:
        """Download to a temporary sibling of ``local_path``, then rename it into place."""
        dst = Path(local_path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        full = self._key(key)

        def run() -> None:
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
            os.close(fd)
            try:
                self.client.download_file(self.bucket, full, tmp, Config=self.transfer)
                os.replace(tmp, dst)
            finally:
                Path(tmp).unlink(missing_ok=True)

        self._retry(key, run)
