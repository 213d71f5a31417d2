"""Several adapters over one base, merging, and the request timeout (server in a thread, real socket).

Aspects covered:

- KUBETUNE_ADAPTERS: every name is served, the ``model`` field picks the adapter, the bare base
  is ``<name>-base``; concurrent requests for different adapters give the same text as one by one
- mergeAdapter: the merged model answers exactly like the unmerged adapter, and no base is listed
- requestTimeoutSeconds: a request that outlives it gets 504 (streams: an error event), counted
  as code 504 in the metrics
- a client that hangs up on a non-streaming request stops its generation (counted as 499)
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kubetune_server.config import from_env
from tests.integration.server_harness import ThreadServer, free_port, metric_value, random_adapter


@pytest.fixture(scope="module")
def adapters(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different random adapters."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: random_adapter(tiny_base_model, root / name, seed=i + 1)
        for i, name in enumerate(("a", "b"))
    }


def serve(tiny_base_model: Path, tmp_path: Path, **env: str) -> ThreadServer:
    settings = from_env(
        {
            "KUBETUNE_MODEL_URI": tiny_base_model.as_uri(),
            "KUBETUNE_PORT": str(free_port()),
            "KUBETUNE_CACHE_DIR": str(tmp_path / "cache"),
            **env,
        }
    )
    server = ThreadServer(settings)
    server.wait_ready()
    return server


def complete(
    server: ThreadServer, model: str, prompt: str = "Hello there.", **extra
) -> httpx.Response:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def test_several_adapters_are_chosen_by_the_model_field(tiny_base_model, adapters, tmp_path):
    server = serve(
        tiny_base_model,
        tmp_path,
        KUBETUNE_ADAPTER_URI=adapters["a"].as_uri(),
        KUBETUNE_MODEL_NAME="a",
        KUBETUNE_ADAPTERS=json.dumps({"b": adapters["b"].as_uri()}),
        KUBETUNE_SERVER_CONFIG=json.dumps({"batchWaitMs": 50}),
    )
    try:
        listed = {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
        assert listed == {"a", "b", "a-base"}
        names = ["a", "b", "a-base"]
        prompts = ["Hello there.", "What is the code word for zorb?"]
        sequential = {
            (m, p): complete(server, m, p).json()["choices"][0]["text"]
            for m in names
            for p in prompts
        }
        # The three models disagree: the adapter really is switched per request.
        assert len({sequential[(m, prompts[0])] for m in names}) == 3
        with ThreadPoolExecutor(len(sequential)) as pool:
            keys = list(sequential)
            concurrent = dict(
                zip(
                    keys,
                    pool.map(lambda k: complete(server, *k).json()["choices"][0]["text"], keys),
                    strict=True,
                )
            )
        assert concurrent == sequential
    finally:
        server.stop()


def test_merged_adapter_answers_like_the_unmerged_one(tiny_base_model, adapters, tmp_path):
    env = {"KUBETUNE_ADAPTER_URI": adapters["a"].as_uri(), "KUBETUNE_MODEL_NAME": "a"}
    unmerged = serve(tiny_base_model, tmp_path / "u", **env)
    try:
        expected = [
            complete(unmerged, "a", p).json()["choices"][0]["text"] for p in ("Hello there.", "Hi!")
        ]
    finally:
        unmerged.stop()
    merged = serve(
        tiny_base_model, tmp_path / "m", KUBETUNE_SERVER_CONFIG='{"mergeAdapter": true}', **env
    )
    try:
        assert [m["id"] for m in httpx.get(f"{merged.url}/v1/models").json()["data"]] == ["a"]
        assert [
            complete(merged, "a", p).json()["choices"][0]["text"] for p in ("Hello there.", "Hi!")
        ] == expected
    finally:
        merged.stop()


def test_request_timeout_is_504_and_counted(tiny_base_model, tmp_path):
    server = serve(
        tiny_base_model,
        tmp_path,
        KUBETUNE_MODEL_NAME="slow",
        # 100 ms per token: even a max_tokens clamped by the model's length takes several
        # seconds, far beyond the 1 s timeout.
        KUBETUNE_FAULT_TOKEN_LATENCY_MS="100",
        KUBETUNE_SERVER_CONFIG=json.dumps({"requestTimeoutSeconds": 1, "maxTokensLimit": 200}),
    )
    try:
        resp = complete(server, "slow", max_tokens=200)
        assert resp.status_code == 504
        assert resp.json()["error"]["code"] == "timeout"
        with httpx.stream(
            "POST",
            f"{server.url}/v1/completions",
            json={
                "model": "slow",
                "prompt": "Hi",
                "max_tokens": 200,
                "ignore_eos": True,
                "stream": True,
            },
            timeout=60,
        ) as stream:
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        assert events[-1] == "[DONE]"
        assert (
            metric_value(
                server.metrics(), "kubetune_server_requests_total", model="slow", code="504"
            )
            == 2
        )
    finally:
        server.stop()


def test_client_hanging_up_stops_the_generation(tiny_base_model, tmp_path):
    server = serve(
        tiny_base_model,
        tmp_path,
        KUBETUNE_MODEL_NAME="slow",
        # 20 ms per token x 200 tokens = 4 s of generation if nobody stopped it.
        KUBETUNE_FAULT_TOKEN_LATENCY_MS="20",
        KUBETUNE_SERVER_CONFIG=json.dumps({"maxTokensLimit": 200}),
    )
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{server.url}/v1/completions",
                json={"model": "slow", "prompt": "Hi", "max_tokens": 200, "ignore_eos": True},
                timeout=httpx.Timeout(60, read=0.3),
            )
        deadline = time.monotonic() + 30
        while metric_value(server.metrics(), "kubetune_server_requests_total", code="499") < 1:
            assert time.monotonic() < deadline, "the abandoned request never ended"
            time.sleep(0.05)
        # Stopped long before its 200 tokens (about 0.3 s + one poll of 0.25 s in).
        assert (
            metric_value(server.metrics(), "kubetune_server_generated_tokens_total", model="slow")
            < 200
        )
    finally:
        server.stop()
