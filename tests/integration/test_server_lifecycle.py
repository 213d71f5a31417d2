"""The server's life: loading from S3, back-pressure, draining on SIGTERM, faults, bad config.

Aspects covered:

- the base model and an adapter come from the moto S3 server (manifests verified, the adapter
  digest exported in kubetune_server_info)
- a full queue answers 429 with Retry-After and an OpenAI ``rate_limit_error`` body
- SIGTERM: a stream in flight runs to its last token, the process exits 0
- fault injection (KUBETUNE_FAULT_ERROR_RATE / _LATENCY_MS) makes 5xx the canary analysis counts
- a bad environment or an unloadable model exits non-zero with the reason in the log and
  the termination message
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from kubetune.rollout.analysis import counters_from_text
from kubetune.storage import open_store
from kubetune.storage.manifests import manifest_digest, write_manifest
from kubetune_server.config import from_env
from tests.integration.server_harness import (
    ROOT,
    ThreadServer,
    free_port,
    metric_value,
    random_adapter,
    start_server,
)

LONG = 300  # tokens: long enough to still be generating while the test acts


@pytest.fixture(scope="module")
def s3_model(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str):
    """Base model (with a manifest) and a random adapter uploaded to a moto bucket."""
    import boto3

    from tests.plugins.s3 import REGION, s3_env_for

    env = s3_env_for(s3_endpoint)
    boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="server-models")
    work = tmp_path_factory.mktemp("s3-model")
    base = shutil.copytree(tiny_base_model, work / "base")
    write_manifest(base, {"kind": "model"})
    adapter = random_adapter(tiny_base_model, work / "adapter")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        store = open_store(
            "s3://server-models/runs/r1", {"endpoint": s3_endpoint, "region": REGION}
        )
        store.child("base").upload_dir(base)
        store.child("adapter").upload_dir(adapter)
    return {
        "env": env,
        "model_uri": "s3://server-models/runs/r1/base",
        "adapter_uri": "s3://server-models/runs/r1/adapter",
        "adapter_digest": manifest_digest(json.loads((adapter / "manifest.json").read_text())),
    }


@pytest.fixture(scope="module")
def s3_server(s3_model, tmp_path_factory: pytest.TempPathFactory):
    """A server loading from S3 with room for one running and one queued request."""
    proc = start_server(
        tmp_path_factory.mktemp("s3-server"),
        KUBETUNE_MODEL_URI=s3_model["model_uri"],
        KUBETUNE_ADAPTER_URI=s3_model["adapter_uri"],
        KUBETUNE_MODEL_NAME="canary",
        KUBETUNE_REVISION="rev-s3",
        # 10 ms per token: a LONG stream holds the one batch slot for seconds, not milliseconds.
        KUBETUNE_FAULT_TOKEN_LATENCY_MS="10",
        KUBETUNE_SERVER_CONFIG=json.dumps(
            {
                "maxBatchSize": 1,
                "batchWaitMs": 0,
                "maxQueue": 1,
                "maxTokensLimit": 400,
                "requestTimeoutSeconds": 60,
            }
        ),
        **s3_model["env"],
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _stream(client: httpx.Client, url: str, max_tokens: int = LONG):
    body = {
        "model": "canary",
        "prompt": "Hello there.",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    return client.stream("POST", f"{url}/v1/completions", json=body, timeout=60)


def _events(lines):
    for line in lines:
        if line.startswith("data: "):
            yield line[len("data: ") :]


def test_model_and_adapter_load_from_s3_with_the_digest_exported(s3_server, s3_model):
    text = s3_server.metrics()
    assert (
        metric_value(
            text,
            "kubetune_server_info",
            revision="rev-s3",
            model="canary",
            adapter_digest=s3_model["adapter_digest"],
        )
        == 1
    )
    resp = httpx.post(
        f"{s3_server.url}/v1/completions",
        json={"model": "canary", "prompt": "Hi!", "max_tokens": 4},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert "downloading s3://server-models/runs/r1/base" in s3_server.log()


def test_full_queue_answers_429_with_retry_after(s3_server):
    with httpx.Client() as running, httpx.Client() as queued:
        with _stream(running, s3_server.url) as first:
            assert first.status_code == 200
            # NB: keep the iterator referenced: a dropped one is closed by the GC, and that closes
            # the connection (the server then cancels the request, freeing the slot).
            events = _events(first.iter_lines())
            next(events)  # generating now: the only batch slot is taken
            with _stream(queued, s3_server.url, max_tokens=2) as second:
                assert second.status_code == 200  # admitted: the one queue slot is taken
                resp = httpx.post(
                    f"{s3_server.url}/v1/completions",
                    json={"model": "canary", "prompt": "x", "max_tokens": 2},
                    timeout=30,
                )
                assert resp.status_code == 429, resp.text
                assert resp.headers["Retry-After"] == "1"
                assert resp.json()["error"]["type"] == "rate_limit_error"
    assert (
        metric_value(
            s3_server.metrics(), "kubetune_server_requests_total", model="canary", code="429"
        )
        >= 1
    )


def test_sigterm_drains_the_stream_in_flight_then_exits_zero(s3_server):
    # Runs last in this module: it stops the module's server.
    received = []
    with httpx.Client() as client, _stream(client, s3_server.url) as resp:
        events = _events(resp.iter_lines())
        received.append(next(events))
        s3_server.proc.send_signal(signal.SIGTERM)
        received.extend(events)
    assert received[-1] == "[DONE]"
    chunks = [json.loads(e) for e in received[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert s3_server.proc.wait(30) == 0
    assert "not ready any more" in s3_server.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{s3_server.url}/readyz", timeout=2)


def test_fault_injection_gives_5xx_the_analysis_counts(tiny_base_model, tmp_path):
    settings = from_env(
        {
            "KUBETUNE_MODEL_URI": tiny_base_model.as_uri(),
            "KUBETUNE_MODEL_NAME": "bad",
            "KUBETUNE_PORT": str(free_port()),
            "KUBETUNE_CACHE_DIR": str(tmp_path),
            "KUBETUNE_FAULT_ERROR_RATE": "1",
            "KUBETUNE_FAULT_LATENCY_MS": "50",
        }
    )
    server = ThreadServer(settings)
    try:
        server.wait_ready()
        for _ in range(3):
            resp = httpx.post(
                f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30
            )
            assert resp.status_code == 500
            assert resp.json()["error"]["code"] == "injected_fault"
        counters = counters_from_text(server.metrics())
        assert counters.requests == 3
        assert counters.errors == 3
        # Every request waited the injected 50 ms before failing.
        assert (
            metric_value(
                server.metrics(), "kubetune_server_request_duration_seconds_sum", model="bad"
            )
            >= 0.15
        )
    finally:
        server.stop()


def _run_main(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    full = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "PYTHONPATH": str(ROOT),
        "KUBETUNE_TERMINATION_LOG": str(tmp_path / "term.json"),
    }
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "kubetune_server"],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


# Every bad value is covered in-process by tests/unit/test_server_config.py; these two check
# the process contract (exit 2, stderr, termination message) end to end.
@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "KUBETUNE_MODEL_URI is required"),
        (
            {"KUBETUNE_MODEL_URI": "file:///m", "KUBETUNE_SERVER_CONFIG": '{"maxBatchSize": 0}'},
            "KUBETUNE_SERVER_CONFIG.maxBatchSize",
        ),
    ],
)
def test_bad_environment_exits_2_naming_the_variable(tmp_path, env, needle):
    result = _run_main(env, tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr
    term = json.loads((tmp_path / "term.json").read_text())
    assert term["outcome"] == "config_error"
    assert needle in term["message"]


def test_unloadable_model_exits_1_with_the_reason(tmp_path):
    result = _run_main(
        {"KUBETUNE_MODEL_URI": (tmp_path / "missing").as_uri(), "KUBETUNE_PORT": "0"}, tmp_path
    )
    assert result.returncode == 1
    term = json.loads((tmp_path / "term.json").read_text())
    assert term["outcome"] == "storage_error"
    assert "missing" in term["message"]
