"""The prometheus analysis provider against a real Prometheus that scrapes real servers (issue 13).

Everything here is real except the Kubernetes control plane (kmock, as in the other operator
tests) and Prometheus' service discovery: Debian's ``prometheus`` binary runs on loopback with
the scrape job the Prometheus Operator generates for the chart's own PodMonitor (rendered by the
real Helm engine, relabelings and all), and a ``file_sd`` file stands in for ``kubernetes_sd``:
it lists the pods the test creates from the operator's Deployments, with the ``__meta_kubernetes_
pod_*`` labels Kubernetes discovery would give them. Behind each pod is a real
``python -m kubetune_server`` process serving the tiny model, started with the revision's
``spec.server.env`` (so a faulty canary is faulty through KUBETUNE_FAULT_*, as a user would
configure it). Traffic is real HTTP through a weighted router that follows the HTTPRoute.

Aspects covered:
- the series of a revision's pods carry ``namespace`` and ``revision`` through the PodMonitor,
  and the counters the provider reads from Prometheus are the counters in the pods' own
  /metrics (the two providers see the same numbers), for the built-in server and for a real
  vLLM /metrics sample read through the vLLM metric map;
- without the PodMonitor's relabeling (the classic annotation scrape: ``kubetune_io_revision``)
  the provider says that no target carries the labels, instead of reading zero traffic (the bug
  of issue 13: the example canary stayed Inconclusive and rolled back at its deadline);
- the real operator with ``analysis.provider: prometheus`` and the default queries promotes a
  healthy canary on Successful intervals;
- and rolls back a canary that returns errors, and a slow one (the sequential latency test),
  with weight 0 first and the reason from Prometheus' figures.

Waiting is on conditions (Prometheus has the samples, the object reached a phase), never a
fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from aiohttp import web

from kubetune.api.modeldeployment import PrometheusProvider
from kubetune.k8s import scraping
from kubetune.rollout import analysis as an
from kubetune.rollout.metricmaps import VLLM, VLLM_MAP
from tests.integration.server_harness import ServerProcess, start_server
from tests.integration.test_operator_rollout import (
    API,
    NS,
    mdep,
    play_deployment,
    revision,
    route_weights,
    wait_phase,
)
from tests.plugins.kube import wait_for, wait_for_object
from tests.plugins.prometheus import PrometheusServer, pod_targets, podmonitor_scrape_config
from tests.unit.test_chart import NAMESPACE as CHART_NAMESPACE
from tests.unit.test_chart import render

# Generous for a loaded 2-core box; a passing run is far quicker.
TIMEOUT = 150.0
# Loading torch and the tiny model, several servers at once on a shared 2-core box.
SERVER_START_TIMEOUT = 300.0
# spec.server.env of the stable revision (one server process serves it in every test).
STABLE_ENV = {"KUBETUNE_DEMO_REVISION": "a"}


def chart_podmonitor() -> dict[str, Any]:
    """The chart's PodMonitor, rendered by the real Helm engine."""
    objects = render({"serverMetrics": {"podMonitor": {"enabled": True}}})
    (monitor,) = [o for o in objects if o["kind"] == "PodMonitor"]
    assert monitor["metadata"]["namespace"] == CHART_NAMESPACE
    return monitor


class Discovery:
    """The file_sd file: the pods Kubernetes discovery would list, each at its real process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.groups: dict[str, dict[str, Any]] = {}
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(list(self.groups.values())))
        tmp.replace(self.path)  # atomic: Prometheus never reads half a file

    def add(self, pod: dict[str, Any], address: str) -> None:
        self.groups[pod["metadata"]["name"]] = pod_targets(pod, address)
        self._write()

    def remove_prefix(self, prefix: str) -> None:
        self.groups = {k: v for k, v in self.groups.items() if not k.startswith(prefix)}
        self._write()


def start_prometheus(
    prometheus: Callable[..., PrometheusServer], tmp_path: Path, relabel: bool = True
) -> tuple[PrometheusServer, Discovery]:
    discovery = Discovery(tmp_path / "pods.json")
    monitor = chart_podmonitor()
    if not relabel:
        # The classic annotation-driven job of the community chart: pod labels mapped as they
        # are (kubetune.io/revision -> kubetune_io_revision), no `revision`.
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            endpoint["relabelings"] = [
                {"action": "labelmap", "regex": "__meta_kubernetes_pod_label_(.+)"}
            ]
    server = prometheus(podmonitor_scrape_config(monitor, discovery.path))
    return server, discovery


def model_spec(model_uri: str, env: dict[str, str], address: str, **analysis: Any) -> dict:
    """A ModelDeployment with analysis.provider prometheus and the default queries."""
    return {
        "apiVersion": API,
        "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": NS},
        "spec": {
            "model": {"baseModel": {"uri": model_uri}, "name": "chat"},
            "replicas": 1,
            "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"},
            "server": {"env": [{"name": k, "value": v} for k, v in env.items()]},
            "traffic": {"mode": "gatewayAPI", "parentRefs": [{"name": "gw"}]},
            "rollout": {
                "steps": [{"setWeight": 50}, {"analysis": {"intervals": 2}}],
                "analysis": {
                    "interval": "4s",
                    "minSamples": 10,
                    "provider": "prometheus",
                    "prometheus": {"address": address},
                    "thresholds": {"maxErrorRate": 0.05, "maxLatencyRatio": 4},
                    **analysis,
                },
                "scaleDownDelaySeconds": 0,
                "progressDeadlineSeconds": 120,
            },
        },
    }


def revision_env(md: dict) -> dict[str, str]:
    """The revision's spec.server.env: the test's process gets what the pod would."""
    return {e["name"]: e["value"] for e in md["spec"]["server"]["env"]}


@pytest.fixture(scope="module")
def server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerProcess]]:
    """Start tiny-model servers (shared by the module, keyed by their env); stopped at the end."""
    started: dict[tuple, ServerProcess] = {}

    def make(model_uri: str, env: dict[str, str]) -> ServerProcess:
        key = (model_uri, *sorted(env.items()))
        if key not in started:
            started[key] = start_server(
                tmp_path_factory.mktemp("server"),
                KUBETUNE_MODEL_URI=model_uri,
                KUBETUNE_MODEL_NAME="chat",
                **env,
            )
        return started[key]

    yield make
    for proc in started.values():
        proc.stop()


def servers_for(
    server_factory: Callable[..., ServerProcess], model_uri: str, *mds: dict
) -> dict[str, ServerProcess]:
    """``{Deployment name: ready server}`` for each manifest's revision (started together)."""
    out = {f"chat-{revision(md)}": server_factory(model_uri, revision_env(md)) for md in mds}
    for proc in out.values():
        proc.wait_ready(timeout=SERVER_START_TIMEOUT)
    return out


@contextlib.asynccontextmanager
async def cluster(
    kube, discovery: Discovery, servers: dict[str, ServerProcess]
) -> AsyncIterator[None]:
    """Play the Deployment controller, the kubelet and Kubernetes discovery.

    A Deployment of a known revision gets its pods (loopback, the real server's port) and the
    pods become scrape targets; a deleted Deployment's pods stop being targets.
    """

    async def loop() -> None:
        while True:
            for name, proc in servers.items():
                dep = await kube.get("apps/v1", "Deployment", NS, name)
                if dep is None:
                    if any(k.startswith(f"{name}-pod-") for k in discovery.groups):
                        discovery.remove_prefix(f"{name}-pod-")
                    continue
                if (dep.get("status") or {}).get("readyReplicas") != dep["spec"]["replicas"]:
                    await play_deployment(kube, name, proc)
                for i in range(dep["spec"]["replicas"]):
                    pod = await kube.get("v1", "Pod", NS, f"{name}-pod-{i}")
                    if pod is not None and pod["metadata"]["name"] not in discovery.groups:
                        discovery.add(pod, f"127.0.0.1:{proc.port}")
            await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def traffic(kube, servers: dict[str, ServerProcess], workers: int = 6) -> AsyncIterator[dict]:
    """Closed-loop clients through a weighted router that follows the HTTPRoute's weights."""
    sent: dict[str, int] = {name: 0 for name in servers}
    weights: dict[str, int] = {}
    rng = random.Random(13)

    async def follow_route() -> None:
        while True:
            weights.update(await route_weights(kube))
            for name in list(weights):
                if name not in servers:
                    weights.pop(name)
            await asyncio.sleep(0.2)

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            live = [(n, w) for n, w in weights.items() if w > 0]
            if not live:
                await asyncio.sleep(0.05)
                continue
            (name,) = rng.choices([n for n, _ in live], [w for _, w in live])
            body = {"model": "chat", "prompt": "hello", "max_tokens": 2}
            with contextlib.suppress(httpx.TransportError):
                await http.post(f"{servers[name].url}/v1/completions", json=body, timeout=30)
            sent[name] += 1

    async with httpx.AsyncClient() as http:
        tasks = [asyncio.create_task(follow_route())]
        tasks += [asyncio.create_task(client(http)) for _ in range(workers)]
        try:
            yield sent
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def deploy_stable(kube, md: dict) -> None:
    await kube.create(md)
    obj = await wait_phase(kube, "Healthy", timeout=TIMEOUT)
    assert obj["status"]["stable"]["name"] == revision(md)


# --- the provider's counters (no operator) ---------------------------------------------------


async def test_prometheus_counters_are_the_pods_own_counters(
    prometheus, tmp_path, server_factory, tiny_base_model_uri
):
    server = servers_for(
        server_factory, tiny_base_model_uri, _md_like(tiny_base_model_uri, STABLE_ENV)
    )
    ((name, proc),) = server.items()
    prom, discovery = start_prometheus(prometheus, tmp_path)
    pod = _pod(name, revision=name.removeprefix("chat-"))
    discovery.add(pod, f"127.0.0.1:{proc.port}")
    async with httpx.AsyncClient() as http:
        for _ in range(12):
            body = {"model": "chat", "prompt": "hello", "max_tokens": 2}
            assert (await http.post(f"{proc.url}/v1/completions", json=body, timeout=30)).is_success
    direct = an.counters_from_text(proc.metrics())
    assert direct.requests >= 12 and direct.latency.total >= 12
    # Wait until Prometheus has scraped every request (no more traffic: the counters are final).
    sel = f'{{namespace="{NS}",revision="{name.removeprefix("chat-")}"}}'
    await asyncio.to_thread(
        prom.wait_for,
        f"sum(kubetune_server_requests_total{sel})",
        lambda r: bool(r) and float(r[0]["value"][1]) == direct.requests,
        "every request scraped",
    )
    provider = PrometheusProvider(address=prom.url)
    async with aiohttp.ClientSession() as session:
        counters, error = await scraping.prometheus_counters(
            session, provider, NS, name.removeprefix("chat-")
        )
    assert error is None, error
    assert counters == direct  # requests, errors, both histograms, tokens; one pod


async def test_without_the_revision_label_the_provider_says_so_issue_13(
    prometheus, tmp_path, server_factory, tiny_base_model_uri
):
    # The bug: nothing created `revision`, the default queries found nothing, and the canary
    # read as "0 requests" (Inconclusive) until its deadline. Now the missing label is named.
    server = servers_for(
        server_factory, tiny_base_model_uri, _md_like(tiny_base_model_uri, STABLE_ENV)
    )
    ((name, proc),) = server.items()
    rev = name.removeprefix("chat-")
    prom, discovery = start_prometheus(prometheus, tmp_path, relabel=False)
    discovery.add(_pod(name, revision=rev), f"127.0.0.1:{proc.port}")
    await asyncio.to_thread(
        prom.wait_for,
        f'up{{namespace="{NS}",kubetune_io_revision="{rev}"}} == 1',
        bool,
        "the pod scraped under the annotation job's labels",
    )
    async with aiohttp.ClientSession() as session:
        counters, error = await scraping.prometheus_counters(
            session, PrometheusProvider(address=prom.url), NS, rev
        )
    assert counters is None
    assert f'no target labelled namespace="{NS}", revision="{rev}"' in error
    assert "serverMetrics.podMonitor.enabled" in error


VLLM_FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures"


@pytest.mark.parametrize(
    "files",
    [("vllm_metrics_opt125m.txt",), ("vllm_metrics_opt125m.txt", "vllm_http_metrics.txt")],
    ids=["engine-counters-only", "with-http-metrics"],
)
async def test_vllm_counters_from_prometheus_are_the_scrapes_counters(prometheus, tmp_path, files):
    # A real vLLM /metrics text (the metric maps' fixtures), scraped by the real Prometheus:
    # the vLLM map's counter queries (names with colons, http_requests_total by handler and
    # status, the fallback of a vLLM without HTTP metrics) read what the scrape holds.
    text = "".join((VLLM_FIXTURES / f).read_text() for f in files)
    app = web.Application()
    app.router.add_get("/metrics", lambda _r: web.Response(text=text, content_type="text/plain"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        prom, discovery = start_prometheus(prometheus, tmp_path)
        discovery.add(_pod("chat-vllm0", revision="vllm0"), f"127.0.0.1:{port}")
        expected = an.counters_from_text(text, VLLM_MAP)
        assert expected.requests > 0 and expected.latency.total > 0
        await asyncio.to_thread(
            prom.wait_for,
            f'up{{namespace="{NS}",revision="vllm0"}} == 1',
            bool,
            "the vLLM sample scraped",
        )
        async with aiohttp.ClientSession() as session:
            counters, error = await scraping.prometheus_counters(
                session, PrometheusProvider(address=prom.url), NS, "vllm0", VLLM
            )
        assert error is None, error
        assert counters == expected
    finally:
        await runner.cleanup()


def _md_like(model_uri: str, env: dict[str, str]) -> dict:
    return model_spec(model_uri, env, "http://unused:9090")


def _pod(name: str, revision: str) -> dict[str, Any]:
    # The labels and port the rollout builder gives a serving pod (checked by test_chart).
    return {
        "metadata": {
            "name": f"{name}-pod-0",
            "namespace": NS,
            "labels": {
                "kubetune.io/owner": "chat",
                "kubetune.io/kind": "ModelDeployment",
                "kubetune.io/component": "server",
                "kubetune.io/revision": revision,
            },
        },
        "spec": {
            "containers": [{"name": "server", "ports": [{"name": "http", "containerPort": 8080}]}]
        },
    }


# --- the operator, from scraping to a verdict ---------------------------------------------------


async def test_healthy_canary_is_promoted_on_prometheus_figures(
    kube, operator, prometheus, tmp_path, server_factory, tiny_base_model_uri
):
    prom, discovery = start_prometheus(prometheus, tmp_path)
    md_a = model_spec(tiny_base_model_uri, STABLE_ENV, prom.url)
    md_b = model_spec(tiny_base_model_uri, {"KUBETUNE_DEMO_REVISION": "b"}, prom.url)
    rev_b = revision(md_b)
    servers = servers_for(server_factory, tiny_base_model_uri, md_a, md_b)
    async with cluster(kube, discovery, servers), traffic(kube, servers) as sent:
        await deploy_stable(kube, md_a)
        await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_b["spec"]})
        obj = await wait_for_object(
            kube,
            API,
            "ModelDeployment",
            NS,
            "chat",
            lambda o: (o.get("status") or {}).get("stable", {}).get("name") == rev_b,
            timeout=TIMEOUT,
        )
    verdicts = [r for r in obj["status"]["analysis"] if r["revision"] == rev_b]
    passed = [r for r in verdicts if r["phase"] == "Successful"]
    assert len(passed) >= 2, verdicts
    assert not [r for r in verdicts if r["phase"] == "Failed"], verdicts
    # The figures are Prometheus' counters of real traffic, both revisions side by side.
    assert all(r["samples"] >= 10 and r["stable"]["requests"] >= 10 for r in passed)
    assert sent[f"chat-{rev_b}"] >= 20


async def _route_without(kube, backend: str) -> dict[str, int] | None:
    """The route's weights once ``backend`` gets none of the traffic (else None)."""
    weights = await route_weights(kube)
    return None if weights.get(backend) else weights


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ({"KUBETUNE_FAULT_ERROR_RATE": "0.5"}, "error rate"),
        # Above the 2.5 s bucket bound, whatever stable's p99 on a loaded box: the sequential
        # test counts requests above the first bound at or beyond 4x stable's p99.
        ({"KUBETUNE_FAULT_LATENCY_MS": "4000"}, "canary requests slower than"),
    ],
    ids=["errors", "latency"],
)
async def test_faulty_canary_is_rolled_back_on_prometheus_figures(
    kube, operator, prometheus, tmp_path, server_factory, tiny_base_model_uri, fault, needle
):
    prom, discovery = start_prometheus(prometheus, tmp_path)
    md_a = model_spec(tiny_base_model_uri, STABLE_ENV, prom.url)
    md_bad = model_spec(tiny_base_model_uri, {"KUBETUNE_DEMO_REVISION": "c", **fault}, prom.url)
    rev_bad = revision(md_bad)
    servers = servers_for(server_factory, tiny_base_model_uri, md_a, md_bad)
    async with cluster(kube, discovery, servers), traffic(kube, servers) as sent:
        await deploy_stable(kube, md_a)
        await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_bad["spec"]})
        obj = await wait_phase(kube, "RolledBack", timeout=TIMEOUT)
        # Record, then act (docs/contracts.md): the route follows the recorded rollback.
        weights = await wait_for(
            lambda: _route_without(kube, f"chat-{rev_bad}"), timeout=TIMEOUT, what="route at 0"
        )
    rejected = obj["status"]["rejectedRevisions"][0]
    assert rejected["name"] == rev_bad and needle in rejected["reason"], rejected
    assert not weights.get(f"chat-{rev_bad}")
    assert obj["status"]["stable"]["name"] == revision(md_a)
    failed = [r for r in obj["status"]["analysis"] if r["phase"] == "Failed"]
    assert failed and failed[-1]["revision"] == rev_bad
    assert sent[f"chat-{rev_bad}"] > 0
    assert (await mdep(kube))["status"]["phase"] == "RolledBack"
