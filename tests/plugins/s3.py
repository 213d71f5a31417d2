"""Pytest plugin: a real S3 protocol server (moto's server mode) on loopback, and a fault proxy.

Fixtures:

- ``s3_endpoint`` (session): ``http://127.0.0.1:<port>`` of a ThreadedMotoServer.
- ``s3_env`` (function): sets AWS_ENDPOINT_URL, AWS_REGION and dummy keys in ``os.environ``
  (monkeypatched) and returns them as a dict, ready to pass to a subprocess.
- ``s3_storage``: a ``StorageConfig`` pointing at the moto server.
- ``s3_bucket``: a fresh, empty bucket per test (its name).
- ``s3_uri``: ``s3://<fresh bucket>/run`` (a prefix in that bucket).
- ``fault_proxy``: factory ``fault_proxy(error_rate=0.1, truncate_rate=0.0, seed=0,
  upstream=s3_endpoint) -> FaultProxy``; a loopback HTTP proxy that answers the given fraction
  of requests with ``503 SlowDown`` (S3's own throttling answer), cuts the given fraction of
  GET bodies off halfway, and forwards everything else. ``proxy.endpoint`` goes where the
  S3 endpoint would; ``proxy.requests`` / ``proxy.faults`` / ``proxy.truncations`` count.
"""

from __future__ import annotations

import http.client
import itertools
import random
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from kubetune.api.common import StorageConfig

REGION = "us-east-1"
_bucket_ids = itertools.count()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """Start moto's S3 server on a free loopback port for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_env_for(endpoint: str) -> dict[str, str]:
    """Environment variables that point boto3 (and kubetune.storage) at ``endpoint``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": REGION,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        # Keep boto3 away from ~/.aws and instance metadata while testing.
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this process's environment at the moto server; returns the variables."""
    env = s3_env_for(s3_endpoint)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return env


@pytest.fixture
def s3_storage(s3_endpoint: str) -> StorageConfig:
    """A StorageConfig reaching the moto server."""
    return StorageConfig(endpoint=s3_endpoint, region=REGION)


@pytest.fixture
def s3_bucket(s3_env: dict[str, str]) -> str:
    """A fresh, empty bucket for this test."""
    import boto3

    name = f"kt-test-{next(_bucket_ids)}-{random.randrange(1 << 30):x}"
    client = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"], region_name=REGION)
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_uri(s3_bucket: str) -> str:
    """A prefix URI inside a fresh bucket."""
    return f"s3://{s3_bucket}/run"


# --- fault-injecting proxy ------------------------------------------------------------------

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}
_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate (injected by the test fault proxy).</Message></Error>"
)


class FaultProxy:
    """A loopback HTTP proxy in front of ``upstream`` that injects 503s and truncated bodies."""

    def __init__(self, upstream: str, error_rate: float = 0.1, truncate_rate: float = 0.0, seed: int = 0):
        if not 0 <= error_rate < 1 or not 0 <= truncate_rate < 1:
            raise ValueError("error_rate and truncate_rate must be in [0, 1)")
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.error_rate = error_rate
        self.truncate_rate = truncate_rate
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        self.faults = 0
        self.truncations = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _decide(self, method: str) -> str:
        with self._lock:
            self.requests += 1
            roll = self._random.random()
            if roll < self.error_rate:
                self.faults += 1
                return "fail"
            if method == "GET" and roll < self.error_rate + self.truncate_rate:
                return "truncate"
            return "forward"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            # Trailers until the blank line.
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                decision = proxy._decide(self.command)
                if decision == "fail":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(_SLOWDOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(_SLOWDOWN)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    status, resp_headers = resp.status, resp.getheaders()
                finally:
                    conn.close()
                if decision == "truncate" and len(data) >= 2 and 200 <= status < 300:
                    with proxy._lock:
                        proxy.truncations += 1
                    data_to_send, cut = data[: len(data) // 2], True
                else:
                    data_to_send, cut = data, False
                self.send_response(status)
                for key, value in resp_headers:
                    if key.lower() not in _HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                if length is not None:
                    self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data_to_send)
                if cut:
                    # Promise the whole body, send half, hang up: a connection dropped mid-stream.
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler


@pytest.fixture
def fault_proxy(s3_endpoint: str):
    """Factory of FaultProxy objects in front of the moto server (closed after the test)."""
    proxies: list[FaultProxy] = []

    def make(error_rate: float = 0.1, truncate_rate: float = 0.0, seed: int = 0,
             upstream: str | None = None) -> FaultProxy:
        proxy = FaultProxy(upstream or s3_endpoint, error_rate, truncate_rate, seed)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
