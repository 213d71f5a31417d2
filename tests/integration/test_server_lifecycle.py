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

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
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


# --- the lineage guarantee (issue 13) -----------------------------------------------------


def _wait_settled(proc, timeout: float = 300.0) -> httpx.Response:
    """Poll /readyz until it stops saying "loading" (ready, or failed for good)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc.poll() is None, proc.log()
        try:
            resp = httpx.get(f"{proc.url}/readyz", timeout=2)
            if resp.json().get("status") != "loading":
                return resp
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"/readyz still loading after {timeout}s:\n{proc.log()}")


def test_an_adapter_with_another_digest_is_not_served_and_the_pod_stays_unready(
    tiny_base_model, tmp_path
):
    """Bug (issue 13): a changed artifact under the revision's URI was served with a warning."""
    adapter = random_adapter(tiny_base_model, tmp_path / "adapter")
    found = manifest_digest(json.loads((adapter / "manifest.json").read_text()))
    expected = "sha256:" + "0" * 64
    proc = start_server(
        tmp_path,
        KUBETUNE_MODEL_URI=tiny_base_model.as_uri(),
        KUBETUNE_ADAPTER_URI=adapter.as_uri(),
        KUBETUNE_MODEL_NAME="m",
        KUBETUNE_ADAPTER_DIGEST=expected,
    )
    try:
        ready = _wait_settled(proc)
        assert ready.status_code == 503
        body = ready.json()
        assert body["status"] == "failed" and body["reason"] == "AdapterDigestMismatch"
        assert body["expectedDigest"] == expected and body["foundDigest"] == found
        assert found in body["message"] and expected in body["message"]
        # Alive (no crash loop re-downloading the same artifact), but nothing is served.
        assert httpx.get(f"{proc.url}/healthz").status_code == 200
        resp = httpx.post(f"{proc.url}/v1/completions", json={"model": "m", "prompt": "x"})
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "not_ready"
        assert proc.proc.poll() is None
        # Both runtimes read the reason off the unready pod, with the digest it found.
        operator_sees, local_sees = asyncio.run(_what_the_runtimes_see(proc, tmp_path))
        assert operator_sees[0] == local_sees[0] == "AdapterDigestMismatch"
        assert operator_sees[1].startswith("pod m-0: adapter digest mismatch: ")
        assert found in operator_sees[1] and found in local_sees[1]
    finally:
        proc.stop()
    assert "not serving" in proc.log()


async def _what_the_runtimes_see(proc, tmp_path) -> tuple[tuple, tuple]:
    """The operator's readiness_failure on the pod, and the local runtime's after its probe."""
    import aiohttp

    from kubetune.k8s import scraping
    from kubetune.local.deployments import DeploymentDriver, LocalRevision, MdepState, Replica
    from kubetune.local.processes import Supervisor
    from kubetune.local.router import WeightedRouter
    from kubetune.local.store import Store
    from kubetune.rollout.builders import readiness_failure

    pod = {
        "metadata": {"name": "m-0"},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": proc.port}]}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "False"}],
        },
    }
    async with aiohttp.ClientSession() as session:
        operator_sees = await scraping.readiness_failure(session, [pod])

    class Running:  # the supervisor's view of a live process
        running = True

    supervisor = Supervisor()
    supervisor.get = lambda name: Running()
    driver = DeploymentDriver(Store(tmp_path / "store"), supervisor)
    state = MdepState(router=WeightedRouter())
    local = LocalRevision(name="r", manifest={}, desired=1)
    local.replicas.append(Replica(index=0, process_name="server/m-r-0", port=proc.port))
    state.revisions["r"] = local
    try:
        await driver._probe(state)
    finally:
        await driver._client().close()
    assert not local.replicas[0].ready
    return operator_sees, readiness_failure(local.replicas[0].unready_body)


@pytest.mark.parametrize("pin", ["right digest", "revision label"])
def test_the_artifact_the_revision_was_built_for_is_served(tiny_base_model, tmp_path, pin):
    adapter = random_adapter(tiny_base_model, tmp_path / "adapter")
    digest = manifest_digest(json.loads((adapter / "manifest.json").read_text()))
    proc = start_server(
        tmp_path,
        KUBETUNE_MODEL_URI=tiny_base_model.as_uri(),
        KUBETUNE_ADAPTER_URI=adapter.as_uri(),
        KUBETUNE_MODEL_NAME="m",
        # An explicit adapter's revision label is not a manifest digest: not checked.
        KUBETUNE_ADAPTER_DIGEST=digest if pin == "right digest" else "v3",
    )
    try:
        assert _wait_settled(proc).status_code == 200
    finally:
        proc.stop()
