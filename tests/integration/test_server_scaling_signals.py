"""The server's autoscaling signals on a live server: queue depth and requests in flight.

``kubetune_server_queue_depth`` and ``kubetune_server_requests_in_flight`` are what
docs/operations.md tells an HPA (through a metrics adapter) or a KEDA ScaledObject to target.
A signal that leaks (stays up after the work is done) scales a model up for ever, so:

Aspects covered:
- both are exposed before any request, at 0;
- with one batch slot and slow tokens, concurrent requests show up as in flight (all of them)
  and as queued (all but the one generating), and both go back to 0 once they are answered;
- a streaming client that hangs up mid-answer is no longer in flight;
- requests refused before generation (400) and GETs (/v1/models, probes) leave no count behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from kubetune_server.config import from_env
from tests.integration.server_harness import ThreadServer, free_port, metric_value

MODEL = "signals"
IN_FLIGHT = "kubetune_server_requests_in_flight"
QUEUE = "kubetune_server_queue_depth"


@pytest.fixture(scope="module")
def server(tiny_base_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One batch slot and 20 ms per token: a 40-token answer holds the slot for about a second."""
    settings = from_env(
        {
            "KUBETUNE_MODEL_URI": tiny_base_model.as_uri(),
            "KUBETUNE_MODEL_NAME": MODEL,
            "KUBETUNE_REVISION": "rev-signals",
            "KUBETUNE_FAULT_TOKEN_LATENCY_MS": "20",
            "KUBETUNE_SERVER_CONFIG": json.dumps(
                {"maxBatchSize": 1, "batchWaitMs": 0, "maxQueue": 16, "maxTokensLimit": 64}
            ),
            "KUBETUNE_PORT": str(free_port()),
            "KUBETUNE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        }
    )
    proc = ThreadServer(settings)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def signals(server: ThreadServer) -> tuple[float, float]:
    text = server.metrics()
    return metric_value(text, IN_FLIGHT), metric_value(text, QUEUE)


def until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` until it holds (the timeout only bounds a broken run)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def completion(server: ThreadServer, tokens: int = 40) -> int:
    body = {
        "model": MODEL,
        "prompt": "count",
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code


def test_signals_are_exposed_at_zero_before_any_request(server: ThreadServer) -> None:
    text = server.metrics()
    assert f"\n{IN_FLIGHT} 0.0" in text and f"\n{QUEUE} 0.0" in text, text


def test_concurrent_requests_are_in_flight_and_queued_then_both_return_to_zero(
    server: ThreadServer,
) -> None:
    seen: list[tuple[float, float]] = []

    def three_in_flight_two_queued() -> bool:
        seen.append(signals(server))
        return seen[-1] == (3.0, 2.0)

    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(completion, server) for _ in range(3)]
        until(three_in_flight_two_queued, f"3 in flight, 2 queued (saw {seen[-5:]})")
        assert [a.result() for a in answers] == [200, 200, 200]
    assert signals(server) == (0.0, 0.0)


def test_a_client_hanging_up_mid_stream_is_no_longer_in_flight(server: ThreadServer) -> None:
    body = {"model": MODEL, "prompt": "count", "max_tokens": 64, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{server.url}/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            # Keep the iterator: a dropped one is closed, which closes the response early.
            lines = resp.iter_lines()
            next(lines)  # the first chunk: the request is being answered
            assert signals(server)[0] == 1.0
        # The response is closed here, long before its 64 tokens (about 1.3 s) are out.
    until(lambda: signals(server)[0] == 0.0, "in flight back to 0 after the client hung up")


def test_refused_requests_and_gets_leave_no_count(server: ThreadServer) -> None:
    bad = {"model": MODEL, "prompt": "x", "max_tokens": 999}  # over maxTokensLimit: 400
    assert httpx.post(f"{server.url}/v1/completions", json=bad, timeout=30).status_code == 400
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
    assert signals(server) == (0.0, 0.0)
