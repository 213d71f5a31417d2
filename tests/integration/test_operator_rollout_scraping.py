"""The operator's analysis fetchers against real HTTP servers on loopback (kubetune.k8s.scraping).

Aspects covered: a revision's ready pods are scraped at their own ``http`` container port and
summed; pods that are not ready are skipped; one unreachable ready pod makes the whole revision
"not scraped" with the URL in the error (never a silently smaller sum); a malformed exposition
names the line; each pod is read through the metric map of its own engine label (a real vLLM
scrape is read as vLLM, not as kubetune_server); Prometheus queries are rendered with the revision and namespace and read back
(vector, empty result, NaN); golden prompts are sent to a ready pod and scored, and a pod that
answers nothing is an error.
"""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from kubetune.api.modeldeployment import EvalGate, PrometheusProvider
from kubetune.k8s import scraping


def metrics_text(ok: int, errors: int) -> str:
    return (
        f'kubetune_server_requests_total{{model="m",code="200"}} {ok}\n'
        f'kubetune_server_requests_total{{model="m",code="503"}} {errors}\n'
        'kubetune_server_request_duration_seconds_bucket{model="m",le="0.1"} '
        f"{ok + errors}\n"
        f'kubetune_server_request_duration_seconds_bucket{{model="m",le="+Inf"}} {ok + errors}\n'
    )


async def serve(routes: list[web.RouteDef]) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


def pod(name: str, port: int, ready: bool = True) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "server", "ports": [{"name": "http", "containerPort": port}]}]
        },
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


@pytest.fixture()
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


async def test_ready_pods_are_scraped_and_summed(session):
    r1, p1 = await serve([web.get("/metrics", lambda _r: web.Response(text=metrics_text(90, 10)))])
    r2, p2 = await serve([web.get("/metrics", lambda _r: web.Response(text=metrics_text(45, 5)))])
    try:
        counters, error = await scraping.scrape_revision(
            session, [pod("a", p1), pod("b", p2), pod("c", 1, ready=False)]
        )
        assert error is None and counters is not None
        assert (counters.requests, counters.errors, counters.pods) == (150, 15, 2)
        assert counters.latency.total == 150
    finally:
        await r1.cleanup()
        await r2.cleanup()


async def test_each_pod_is_read_through_its_engines_metric_map(session):
    from pathlib import Path

    from kubetune.api.common import LABEL_ENGINE

    # A real vLLM /metrics scrape (its source is in the fixture's header).
    real = (
        Path(__file__).parents[1] / "unit" / "fixtures" / "vllm_metrics_opt125m.txt"
    ).read_text()
    runner, port = await serve([web.get("/metrics", lambda _r: web.Response(text=real))])
    try:
        vllm_pod = pod("v", port)
        vllm_pod["metadata"]["labels"] = {LABEL_ENGINE: "vllm"}
        counters, error = await scraping.scrape_revision(session, [vllm_pod])
        assert error is None and counters is not None
        assert (counters.requests, counters.errors, counters.generated_tokens) == (1, 0, 7)
        assert counters.latency.total == 1 and counters.ttft.total == 1
        # Without the label the pod is a kubetune_server: none of vLLM's names count.
        unlabelled, error = await scraping.scrape_revision(session, [pod("b", port)])
        assert error is None and unlabelled is not None
        assert (unlabelled.requests, unlabelled.latency.total) == (0, 0)
    finally:
        await runner.cleanup()


async def test_one_unreachable_ready_pod_means_not_scraped(session):
    r1, p1 = await serve([web.get("/metrics", lambda _r: web.Response(text=metrics_text(1, 0)))])
    r2, p2 = await serve([])
    await r2.cleanup()  # port now closed
    try:
        counters, error = await scraping.scrape_revision(session, [pod("a", p1), pod("b", p2)])
        assert counters is None and f":{p2}/metrics" in error
        none, why = await scraping.scrape_revision(session, [pod("c", p1, ready=False)])
        assert none is None and why == "no ready pods to scrape"
    finally:
        await r1.cleanup()


async def test_malformed_exposition_names_the_line(session):
    r1, p1 = await serve(
        [web.get("/metrics", lambda _r: web.Response(text="ok 1\nthis is not { valid\n"))]
    )
    try:
        counters, error = await scraping.scrape_revision(session, [pod("a", p1)])
        assert counters is None and "line 2" in error
    finally:
        await r1.cleanup()


async def test_prometheus_queries_are_rendered_and_read(session):
    seen: list[str] = []
    answers = {"requests": "120", "errorRate": "0.25", "latencyP95": "NaN"}

    async def query(request: web.Request) -> web.Response:
        q = request.query["query"]
        seen.append(q)
        if "code=~" in q:
            key = "errorRate"
        elif "request_duration" in q:
            key = "latencyP95"
        elif "first_token" in q:
            key = "ttft"
        else:
            key = "requests"
        result = [] if key == "ttft" else [{"metric": {}, "value": [0, answers[key]]}]
        return web.json_response(
            {"status": "success", "data": {"resultType": "vector", "result": result}}
        )

    runner, port = await serve([web.get("/api/v1/query", query)])
    try:
        provider = PrometheusProvider(address=f"http://127.0.0.1:{port}")
        got = await scraping.query_prometheus(session, provider, "team-a", "abc123", "10s")
        assert got.requests == 120 and got.error_rate == 0.25
        assert got.p95_latency_seconds is None and got.ttft_p95_seconds is None
        assert all('namespace="team-a",revision="abc123"' in q and "[10s]" in q for q in seen)
    finally:
        await runner.cleanup()


async def test_golden_prompts_are_sent_to_a_ready_pod_and_scored(session):
    asked: list[dict] = []

    async def complete(request: web.Request) -> web.Response:
        body = await request.json()
        asked.append(body)
        text = "Paris" if "France" in body["prompt"] else "no idea"
        return web.json_response({"choices": [{"text": text}]})

    runner, port = await serve([web.post("/v1/completions", complete)])
    gate = EvalGate(
        prompts=[
            {"prompt": "Capital of France?", "expected": "paris"},
            {"prompt": "Capital of Peru?", "expected": "lima"},
        ],
        match="contains",
    )
    try:
        score, error = await scraping.golden_prompt_score(session, [pod("a", port)], gate, "chat")
        assert (score, error) == (0.5, None)
        assert asked[0] == {
            "model": "chat",
            "prompt": "Capital of France?",
            "max_tokens": 32,
            "temperature": 0,
        }
    finally:
        await runner.cleanup()
    score, error = await scraping.golden_prompt_score(
        session, [pod("a", port)], gate, "chat", timeout=2
    )
    assert score is None and "no golden prompt answered" in error
