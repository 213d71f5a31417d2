"""API keys on the inference server (``spec.server.apiKeySecret`` -> ``KUBETUNE_API_KEY``), issue 13.

Aspects covered, against a real ``python -m kubetune_server`` process:

- with the key: the official ``openai`` client works (models, completions, streaming chat)
- without it, or with a wrong one: 401 in the OpenAI error shape (``invalid_api_key``) on every
  ``/v1/`` route, ``openai.AuthenticationError`` in the client; counted in /metrics as 401
- probes, /metrics and /openapi.json stay open (the kubelet and the analysis have no key)
- the key never appears in the process's log, its /metrics, or any answer (a wrong key sent
  by a client is not echoed either)
- an empty key is a configuration error at start-up, not authentication switched off
- the clients kubetune itself runs send the key: the operator's eval gate (golden prompts,
  the key read from the Secret named by ``apiKeySecret``) and ``kubetune local traffic``
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.integration.server_harness import ROOT, metric_value, start_server

KEY = "kt-test-9f8e7d6c5b4a"
WRONG = "kt-wrong-0a1b2c3d4e5f"


@pytest.fixture(scope="module")
def server(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = start_server(
        tmp_path_factory.mktemp("auth"),
        KUBETUNE_MODEL_URI=tiny_base_model.as_uri(),
        KUBETUNE_MODEL_NAME="m",
        KUBETUNE_API_KEY=KEY,
    )
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_the_openai_client_with_the_key_is_served(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["m"]
    resp = client.completions.create(model="m", prompt="Hi", max_tokens=2)
    assert resp.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
    )
    assert any(chunk.choices for chunk in stream)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")],
)
@pytest.mark.parametrize("header", [None, f"Bearer {WRONG}", KEY, f"Basic {KEY}"])
def test_requests_without_the_right_bearer_get_401_in_the_openai_shape(
    server, method, path, header
):
    headers = {"Authorization": header} if header else {}
    resp = httpx.request(
        method, server.url + path, headers=headers, json={"model": "m", "prompt": "x"}
    )
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "invalid_api_key"
    assert KEY not in resp.text and WRONG not in resp.text


def test_the_openai_client_with_a_wrong_key_raises_authentication_error(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=WRONG, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.completions.create(model="m", prompt="Hi", max_tokens=2)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json"])
def test_probes_metrics_and_the_schema_stay_open(server, path):
    assert httpx.get(server.url + path).status_code == 200


# --- the clients kubetune runs send the key ------------------------------------------------


def _pod(server) -> dict:
    """A ready pod object pointing at the test server (what the operator reads from the API)."""
    return {
        "metadata": {"name": "p"},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": server.port}]}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


@pytest.mark.parametrize(("key", "answered"), [(KEY, True), (None, False)])
async def test_the_operators_eval_gate_sends_the_key(server, key, answered):
    import aiohttp

    from kubetune.api.modeldeployment import EvalGate
    from kubetune.k8s import scraping
    from kubetune.rollout import evalgate

    gate = EvalGate.model_validate(
        {"prompts": [{"prompt": "Hi", "expected": "zz"}], "maxTokens": 2}
    )
    async with aiohttp.ClientSession() as session:
        score, error = await scraping.golden_prompt_score(
            session, [_pod(server)], gate, "m", headers=evalgate.auth_headers(key)
        )
    if answered:
        assert error is None and score is not None
    else:
        assert score is None and "HTTP 401" in error


@pytest.mark.parametrize(("key", "code"), [(KEY, 200), (None, 401)])
async def test_local_traffic_sends_the_key(server, key, code):
    import asyncio

    from kubetune.local.demo import DemoSettings
    from kubetune.local.traffic import Traffic

    golden = [{"prompt": "Hi", "answer": "x"}]
    traffic = Traffic(
        lambda: server.url, golden, DemoSettings(requests_per_second=50, concurrency=2), "m", key
    )
    await traffic.start()
    try:
        while sum(traffic.stats.codes.get("none", {}).values()) < 4:
            await asyncio.sleep(0.05)
    finally:
        await traffic.stop()
    assert set(traffic.stats.codes["none"]) == {code}


async def test_the_operator_reads_the_key_from_the_secret_and_names_a_missing_one(kube):
    import base64

    from kubetune.api.modeldeployment import ModelDeploymentSpec
    from kubetune.k8s.deployments import read_api_key

    spec = ModelDeploymentSpec.model_validate(
        {
            "model": {"baseModel": {"uri": "s3://bucket/m"}},
            "server": {"apiKeySecret": {"name": "keys", "key": "chat"}},
        }
    )
    assert await read_api_key(kube, "default", spec) == (
        None,
        "spec.server.apiKeySecret: Secret 'keys' key 'chat': not found",
    )
    await kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "keys", "namespace": "default"},
            "data": {"chat": base64.b64encode(KEY.encode()).decode()},
        }
    )
    assert await read_api_key(kube, "default", spec) == (KEY, None)
    plain = ModelDeploymentSpec.model_validate({"model": {"baseModel": {"uri": "s3://bucket/m"}}})
    assert await read_api_key(kube, "default", plain) == (None, None)


def test_local_runtime_finds_the_key_like_the_kubelet_env_does(monkeypatch):
    from kubetune.api.modeldeployment import ModelDeploymentSpec
    from kubetune.local.containers import ContainerError
    from kubetune.local.deployments import api_key_of

    spec = ModelDeploymentSpec.model_validate(
        {"model": {"baseModel": {"uri": "file:///m"}}, "server": {"apiKeySecret": {"name": "k"}}}
    )
    assert (
        api_key_of(spec, lambda name, key: KEY if (name, key) == ("k", "apiKey") else None) == KEY
    )
    monkeypatch.setenv("apiKey", "from-env")
    assert api_key_of(spec, lambda name, key: None) == "from-env"
    monkeypatch.delenv("apiKey")
    with pytest.raises(ContainerError, match="key 'apiKey' of Secret 'k' not found"):
        api_key_of(spec, lambda name, key: None)


def test_401s_are_counted_and_the_key_is_in_no_log_and_no_metric(server):
    httpx.post(
        f"{server.url}/v1/completions",
        headers={"Authorization": f"Bearer {WRONG}"},
        json={"model": "m", "prompt": "x"},
    )
    text = httpx.get(f"{server.url}/metrics").text
    assert metric_value(text, "kubetune_server_requests_total", model="unknown", code="401") >= 1
    assert KEY not in text
    server.stop()  # flush the log: start-up, requests, drain
    log = server.log()
    assert "ready in" in log  # the log did record the server's life
    assert KEY not in log and WRONG not in log


def test_an_empty_key_is_a_configuration_error(tiny_base_model: Path):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBETUNE_")}
    env.update(
        KUBETUNE_MODEL_URI=tiny_base_model.as_uri(), KUBETUNE_API_KEY=" ", PYTHONPATH=str(ROOT)
    )
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "kubetune_server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "KUBETUNE_API_KEY is set but empty" in out.stderr
