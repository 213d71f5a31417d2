"""Canary detection benchmark: how fast a bad canary loses its traffic, and how often a good one does.

Two parts, both comparing kubetune's analysis (``kubetune.rollout.machine.step``: interval
analysis with minSamples plus the 99%-certain fast failure) with a baseline that checks the
canary's success rate at fixed intervals and rolls back after ``threshold`` failed checks --
Flagger's default (interval 1m, threshold 5, request-success-rate >= 99%).

1. **Real traffic on loopback** (``--real-runs``): two small HTTP model servers exposing the
   kubetune_server metric names (docs/contracts.md) with real Prometheus text, the local
   weighted router (``kubetune.local.router``) in front of them, an open-loop load of
   ``--rate`` requests/s through the router, and the state machine driving the router's weights
   from real scrapes of /metrics, exactly as the local runtime does. The canary sits at 10%,
   passes one analysis interval, then starts returning 5xx for ``--bad-error-rate`` of its
   requests. Measured: seconds from going bad to router weight 0, and requests that reached
   the bad canary. The baseline runs the same way with its fixed-interval check (its interval
   is ``--baseline-interval``, 10 s by default to keep the run short; the figure is also
   scaled to Flagger's 1m default).

2. **Many runs in virtual time** (``--sim-runs``): the same ``machine.step`` driven with a
   simulated clock and synthetic counters (Poisson arrivals at the same rate, binomial errors,
   log-normal latencies), so hundreds of full rollouts take seconds: a healthy canary (the same
   0.5% background error rate and latency as stable) through every default step -> false
   rollback rate; a bad canary -> detection time distribution; a slow canary (latency x10, no
   errors) -> whether and when it is caught. The baseline is simulated with Flagger's real
   defaults (1m, 5 checks, 99%).

3. **Thin traffic** (issue 16), 16 requests/s under closed-loop clients (4 callers that each
   wait for their answer, the demo's and most real callers' model) and open-loop ones, with a
   canary that is bad from its first request: latency x30, slow decoding (decode time x4,
   time to first token unchanged), and a 1.5x slower canary that ``maxLatencyRatio: 2`` must
   pass, next to healthy canaries. Real HTTP on loopback (``--thin-real-runs`` per scenario:
   the FakeModelServer behind the local router, real scrapes; latency x30 and x4 scale its
   latency; slow decoding and the 1.5x canary make both servers generate tokens and export
   kubetune_server's own ``Metrics``, TPOT histogram included; ``--thin-real-only`` runs just
   this, ``--thin-real-scenarios`` picks scenarios) and many runs
   in virtual time (a discrete-event simulation: requests are routed when sent and counted by
   their server when answered, each with its latency, time to first token and time per output
   token, as kubetune_server's histograms; >= ``--sim-runs`` healthy rollouts per client
   model, also with a per-request TPOT spread of sigma 0.35 against the decoding-speed test's
   false alarms). Compared
   in the same run with the previous analysis, where every interval is judged alone (Argo
   Rollouts' and Flagger's model): no pooling, no sequential latency test, no starvation.
   Reported: seconds from the canary's first traffic to weight 0, requests the canary got,
   rollbacks of canaries that should pass.

Run: ``.venv/bin/python bench/canary_detection.py`` (about 11 minutes on 2 cores). Appends a
section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest

from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.local.router import WeightedRouter
from kubetune.rollout import analysis as an
from kubetune.rollout import machine as m
from kubetune.rollout.revisions import Revision, resolve
from kubetune_server.metrics import LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, Metrics

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
UTC = datetime.UTC


# --- the rollout under test -------------------------------------------------------------------


def make_md(adapter: str, steps: list[dict], interval: str = "10s") -> dict[str, Any]:
    """A ModelDeployment with the default thresholds (maxErrorRate 5%, minSamples 20)."""
    return {
        "metadata": {"name": "bench", "namespace": "default", "generation": 1, "annotations": {}},
        "spec": {
            "model": {"baseModel": {"uri": "file:///models/base"}, "adapter": {"uri": adapter}},
            "replicas": 1,
            "resources": {"gpus": 0},
            "rollout": {
                "steps": steps,
                "analysis": {"interval": interval, "minSamples": 20, "failureLimit": 1},
                "scaleDownDelaySeconds": 0,
                "progressDeadlineSeconds": 3600,
            },
        },
    }


def revision_of(md: dict) -> Revision:
    rev = resolve(ModelDeploymentSpec.model_validate(md["spec"]), "bench")
    assert isinstance(rev, Revision)
    return rev


HOLD_STEPS = [{"setWeight": 10}, {"analysis": {"intervals": 1000}}]
DEFAULT_STEPS = [
    {"setWeight": 10},
    {"analysis": {"intervals": 2}},
    {"setWeight": 50},
    {"analysis": {"intervals": 2}},
]


class Counters:
    """Cumulative kubetune_server counters of one server (what /metrics exposes)."""

    def __init__(self) -> None:
        self.ok = 0
        self.errors = 0
        self.buckets = [0] * len(BOUNDS)
        self.total = 0

    def observe(self, error: bool, latency: float) -> None:
        if error:
            self.errors += 1
        else:
            self.ok += 1
        self.total += 1
        for i, b in enumerate(BOUNDS):
            if latency <= b:
                self.buckets[i] += 1

    def revision_counters(self) -> an.RevisionCounters:
        hist = an.Histogram(BOUNDS, tuple(float(c) for c in self.buckets), float(self.total))
        return an.RevisionCounters(
            float(self.ok + self.errors), float(self.errors), hist, hist, pods=1
        )

    def text(self) -> str:
        out = [
            "# TYPE kubetune_server_requests_total counter",
            f'kubetune_server_requests_total{{model="bench",code="200"}} {self.ok}',
            f'kubetune_server_requests_total{{model="bench",code="500"}} {self.errors}',
        ]
        for name in (
            "kubetune_server_request_duration_seconds",
            "kubetune_server_time_to_first_token_seconds",
        ):
            out.append(f"# TYPE {name} histogram")
            for b, c in zip(BOUNDS, self.buckets, strict=True):
                out.append(f'{name}_bucket{{model="bench",le="{b}"}} {c}')
            out.append(f'{name}_bucket{{model="bench",le="+Inf"}} {self.total}')
            out.append(f'{name}_count{{model="bench"}} {self.total}')
        return "\n".join(out) + "\n"


# --- part 1: real HTTP on loopback ---------------------------------------------------------------


class FakeModelServer:
    """A tiny model server: /v1/completions with injectable errors, /metrics, /readyz.

    ``decode`` (time-to-first-token factor, decoding factor) makes it generate tokens like
    kubetune_server: each answer waits its time to first token, then decodes a log-normal number
    of tokens at a per-request time per output token (the virtual-time model of part 3, scaled
    by the factors), and /metrics is kubetune_server's own ``Metrics`` (same names and buckets,
    TPOT measured from the first to the last token over the tokens after the first).
    """

    def __init__(
        self,
        name: str,
        error_rate: float,
        seed: int,
        slow: float = 1.0,
        decode: tuple[float, float] | None = None,
    ) -> None:
        self.name = name
        self.error_rate = error_rate
        self.slow = slow  # latency factor (thin-traffic scenarios)
        self.decode = decode
        self.metrics = Metrics() if decode else None
        self.rng = random.Random(seed)
        self.counters = Counters()
        self.served = 0
        self.bad_since: float | None = None
        self.served_while_bad = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def generate(self) -> web.Response:
        """Tokens at a per-request speed, recorded as kubetune_server records them."""
        assert self.decode is not None and self.metrics is not None
        tf, df = self.decode
        started = time.monotonic()
        ttft = tf * self.rng.lognormvariate(math.log(TTFT_MEDIAN), 0.3)
        spread = math.sqrt(0.5**2 - TPOT_SIGMA**2)
        tokens = max(2, round(self.rng.lognormvariate(math.log(TOKENS_MEDIAN), spread)))
        tpot = df * self.rng.lognormvariate(math.log(DECODE_MEDIAN / TOKENS_MEDIAN), TPOT_SIGMA)
        await asyncio.sleep(ttft)
        first = time.monotonic()
        await asyncio.sleep((tokens - 1) * tpot)
        last = time.monotonic()
        self.served += 1
        m, model = self.metrics, "bench"
        m.ttft.labels(model=model).observe(first - started)
        m.tpot.labels(model=model).observe((last - first) / (tokens - 1))
        m.generated_tokens.labels(model=model).inc(tokens)
        m.requests.labels(model=model, code="200").inc()
        m.duration.labels(model=model).observe(time.monotonic() - started)
        usage = {"completion_tokens": tokens}
        return web.json_response({"choices": [{"text": "ok " * tokens}], "usage": usage})

    def metrics_text(self) -> str:
        if self.metrics is not None:
            return generate_latest(self.metrics.registry).decode()
        return self.counters.text()

    async def complete(self, _request: web.Request) -> web.Response:
        if self.decode is not None:
            return await self.generate()
        latency = self.slow * self.rng.lognormvariate(math.log(0.02), 0.3)
        await asyncio.sleep(latency)
        self.served += 1
        if self.bad_since is not None:
            self.served_while_bad += 1
        error = self.rng.random() < self.error_rate
        self.counters.observe(error, latency)
        if error:
            return web.json_response({"error": {"message": "injected"}}, status=500)
        return web.json_response({"choices": [{"text": "ok"}]})

    async def start(self) -> FakeModelServer:
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_get("/metrics", lambda _r: web.Response(text=self.metrics_text()))
        app.router.add_get("/readyz", lambda _r: web.Response(text="ok"))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


async def open_loop_load(url: str, rate: float, stop: asyncio.Event) -> int:
    """Fire ``rate`` requests/s at fixed times (open loop: slow answers do not slow the load)."""
    sent = 0
    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

        async def one() -> None:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.post(
                    url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}
                ) as r:
                    await r.read()

        start = time.monotonic()
        while not stop.is_set():
            sent += 1
            task = asyncio.create_task(one())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        await asyncio.gather(*tasks, return_exceptions=True)
    return sent


async def closed_loop_load(url: str, clients: int, think: float, stop: asyncio.Event) -> int:
    """``clients`` callers that each send the next request only after the last one answered."""
    sent = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:

        async def client() -> None:
            nonlocal sent
            while not stop.is_set():
                sent += 1
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.post(
                        url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}
                    ) as r:
                        await r.read()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), think)

        await asyncio.gather(*(client() for _ in range(clients)))
    return sent


async def scrape(session: aiohttp.ClientSession, server: FakeModelServer) -> an.RevisionCounters:
    async with session.get(server.url + "/metrics") as resp:
        return an.counters_from_text(await resp.text())


async def real_run(
    kind: str, rate: float, bad_error_rate: float, baseline_interval: float, seed: int
) -> dict:
    """One real-traffic run; ``kind`` is 'ours' or 'baseline'. Returns the measured figures."""
    stable = await FakeModelServer("stable", 0.005, seed).start()
    canary = await FakeModelServer("canary", 0.005, seed + 1).start()
    router = WeightedRouter()
    await router.start()
    # kind "healthy": a good canary through the default steps at a 5s interval (false rollbacks?)
    steps, interval = (DEFAULT_STEPS, "5s") if kind == "healthy" else (HOLD_STEPS, "10s")
    md_a = make_md("file:///models/a", steps, interval)
    md_b = make_md("file:///models/b", steps, interval)
    rev_a, rev_b = revision_of(md_a), revision_of(md_b)
    servers = {rev_a.name: stable, rev_b.name: canary}
    router.set_backends({rev_a.name: (stable.url, 100), rev_b.name: (canary.url, 0)})
    stop = asyncio.Event()
    load = asyncio.create_task(open_loop_load(router.url, rate, stop))
    result: dict[str, Any] = {"kind": kind}
    try:
        async with aiohttp.ClientSession() as session:
            if kind in ("ours", "healthy"):
                bad = bad_error_rate if kind == "ours" else None
                result.update(await _drive_ours(session, router, servers, md_a, md_b, bad))
            else:
                result.update(
                    await _drive_baseline(
                        session, router, rev_b.name, canary, bad_error_rate, baseline_interval
                    )
                )
    finally:
        stop.set()
        result["sent"] = await load
        await router.stop()
        await stable.stop()
        await canary.stop()
    return result


async def _observe(session, servers: dict[str, FakeModelServer], model: Revision) -> m.Observed:
    revisions = {}
    for name, server in servers.items():
        revisions[name] = m.RevisionObservation(1, 1, True, counters=await scrape(session, server))
    return m.Observed(model=model, revisions=revisions, mode="local")


def _apply(router: WeightedRouter, decided: m.Step) -> float:
    requeue = 1.0
    for action in decided.actions:
        if isinstance(action, m.SetWeights):
            for name, weight in action.weights.items():
                if name in router.backends and router.backends[name].weight != weight:
                    router.set_weight(name, weight)
        elif isinstance(action, m.Requeue):
            requeue = action.seconds
    return requeue


async def _drive_ours(session, router, servers, md_a, md_b, bad_error_rate) -> dict:
    md = dict(md_a)
    rev_a = revision_of(md_a)
    decided = m.step(md, await _observe(session, servers, rev_a), datetime.datetime.now(UTC))
    md["status"] = decided.status
    md = {**md_b, "status": md["status"]}
    rev_b = revision_of(md_b)
    canary = servers[rev_b.name]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        decided = m.step(md, await _observe(session, servers, rev_b), datetime.datetime.now(UTC))
        md["status"] = decided.status
        wait = _apply(router, decided)
        st = decided.status
        if bad_error_rate is None:
            if "canary" not in st and st.get("phase") in ("Healthy", "RolledBack"):
                return {
                    "rolled_back": st["phase"] == "RolledBack",
                    "seconds": time.monotonic() - deadline + 180,
                    "why": st.get("message", ""),
                }
        elif canary.bad_since is None:
            ok = [r for r in st.get("analysis") or [] if r["phase"] == "Successful"]
            if ok and router.backends[rev_b.name].weight == 10:
                canary.bad_since = time.monotonic()
                canary.error_rate = bad_error_rate
        elif router.backends[rev_b.name].weight == 0:
            return {
                "detect_s": time.monotonic() - canary.bad_since,
                "bad_requests": canary.served_while_bad,
                "why": st.get("message", ""),
                "phase": st.get("phase"),
            }
        await asyncio.sleep(min(wait, 1.0))
    return {"detect_s": None, "bad_requests": canary.served_while_bad, "phase": "timeout"}


async def _drive_baseline(session, router, canary_name, canary, bad_error_rate, interval) -> dict:
    """Flagger-like: every interval, success rate over the interval < 99% is a failed check."""
    router.set_weight(canary_name, 10)
    before = await scrape(session, canary)
    failed = 0
    checks = 0
    while True:
        await asyncio.sleep(interval)
        now = await scrape(session, canary)
        delta = an.interval(before, now)
        before = now
        checks += 1
        if checks == 1:
            canary.bad_since = time.monotonic()  # one good check first, like ours
            canary.error_rate = bad_error_rate
            continue
        if delta is not None and delta.requests > 0 and (1 - (delta.error_rate or 0)) < 0.99:
            failed += 1
        if failed >= 5:
            router.set_weight(canary_name, 0)
            return {
                "detect_s": time.monotonic() - canary.bad_since,
                "bad_requests": canary.served_while_bad,
                "phase": "RolledBack",
                "why": f"{failed} failed checks",
            }


async def real_thin_run(
    scenario: str, closed: bool, baseline: bool, rate: float, seed: int
) -> dict:
    """A canary like ``scenario`` (THIN_REAL_SCENARIOS) from its first request, real HTTP.

    Default steps, interval 10s, minSamples 20; ``baseline``: the previous analysis (each
    interval alone). Returns seconds from the canary's first traffic to weight 0 (None: not
    within the cap), to promotion (a canary that should pass), and the requests it served.
    """
    slow, decode, ratio, bad = THIN_REAL_SCENARIOS[scenario]
    stable = await FakeModelServer("stable", 0.0, seed, decode=decode and (1.0, 1.0)).start()
    canary = await FakeModelServer("canary", 0.0, seed + 1, slow=slow, decode=decode).start()
    router = WeightedRouter()
    await router.start()
    mds = []
    for adapter in ("file:///models/a", "file:///models/b"):
        md = make_md(adapter, DEFAULT_STEPS)
        if baseline:
            md["spec"]["rollout"]["analysis"]["poolWindow"] = "0s"
        if ratio is not None:
            md["spec"]["rollout"]["analysis"]["thresholds"] = {"maxLatencyRatio": ratio}
        mds.append(md)
    rev_a, rev_b = revision_of(mds[0]), revision_of(mds[1])
    servers = {rev_a.name: stable, rev_b.name: canary}
    router.set_backends({rev_a.name: (stable.url, 100), rev_b.name: (canary.url, 0)})
    stop = asyncio.Event()
    # Closed loop sized like the virtual-time one: CLIENTS callers, ``rate`` req/s when healthy.
    mean = 0.02 * math.exp(0.3**2 / 2)
    if decode:
        mean = TTFT_MEDIAN * math.exp(0.3**2 / 2) + DECODE_MEDIAN * math.exp(0.5**2 / 2)
    load = asyncio.create_task(
        closed_loop_load(router.url, CLIENTS, max(0.0, CLIENTS / rate - mean), stop)
        if closed
        else open_loop_load(router.url, rate, stop)
    )
    cap = THIN_REAL_CAP_S if bad else THIN_REAL_PASS_CAP_S
    result: dict[str, Any] = {"seconds": None, "promoted": None, "cap": cap}
    try:
        async with aiohttp.ClientSession() as session:
            with previous_analysis() if baseline else contextlib.nullcontext():
                md = dict(mds[0])
                md["status"] = m.step(
                    md, await _observe(session, servers, rev_a), datetime.datetime.now(UTC)
                ).status
                md = {**mds[1], "status": md["status"]}
                first = None
                end = time.monotonic() + cap + 5
                while time.monotonic() < end:
                    decided = m.step(
                        md, await _observe(session, servers, rev_b), datetime.datetime.now(UTC)
                    )
                    md["status"] = st = decided.status
                    wait = _apply(router, decided)
                    weight = router.backends[rev_b.name].weight
                    if first is None and weight > 0:
                        first = time.monotonic()
                    elif first is not None and st.get("phase") == "Healthy" and "canary" not in st:
                        result["promoted"] = time.monotonic() - first
                        break
                    elif first is not None and weight == 0:
                        result["seconds"] = time.monotonic() - first
                        result["why"] = st.get("message", "")
                        break
                    if first is not None and time.monotonic() - first > cap:
                        break
                    await asyncio.sleep(min(wait, 1.0))
    finally:
        stop.set()
        await load
        result["served"] = canary.served
        await router.stop()
        await stable.stop()
        await canary.stop()
    return result


THIN_REAL_CAP_S = 60.0  # a canary that should be rolled back
THIN_REAL_PASS_CAP_S = 120.0  # one that should be promoted
# name: (latency factor of the plain fake server, token model (TTFT factor, decode factor) or
# None, maxLatencyRatio or None (the default 1.5), should it be rolled back?)
THIN_REAL_SCENARIOS: dict[str, tuple[float, tuple[float, float] | None, float | None, bool]] = {
    "latency x30": (30.0, None, None, True),
    "latency x4": (4.0, None, None, True),
    "slow decoding (decode x4, TTFT same)": (1.0, (1.0, 4.0), None, True),
    "1.5x slower canary, maxLatencyRatio 2": (1.0, (1.5, 1.5), 2.0, False),
}


# --- part 2: virtual time ------------------------------------------------------------------------


class SimRevision:
    """Synthetic traffic of one revision (Poisson arrivals, binomial errors, log-normal latency)."""

    def __init__(self, rng: random.Random, error_rate: float, latency: float = 0.05) -> None:
        self.rng = rng
        self.error_rate = error_rate
        self.latency = latency
        self.c = Counters()

    def serve(self, rate: float, seconds: float) -> None:
        n = _poisson(self.rng, rate * seconds)
        for _ in range(n):
            self.c.observe(
                self.rng.random() < self.error_rate,
                self.rng.lognormvariate(math.log(self.latency), 0.25),
            )


def _poisson(rng: random.Random, lam: float) -> int:
    if lam <= 0:
        return 0
    if lam > 30:
        return max(0, round(rng.gauss(lam, math.sqrt(lam))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def sim_ours(
    rng: random.Random,
    rate: float,
    bad_error_rate: float | None,
    steps: list[dict],
    bad_latency: float | None = None,
) -> dict:
    """One rollout in virtual time. Neither bad_*: a healthy canary through every step."""
    md_a, md_b = make_md("file:///models/a", steps), make_md("file:///models/b", steps)
    rev_a, rev_b = revision_of(md_a), revision_of(md_b)
    sims = {rev_a.name: SimRevision(rng, 0.005), rev_b.name: SimRevision(rng, 0.005)}
    now = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    md = {**md_a}
    md["status"] = m.step(
        md, m.Observed(rev_a, {rev_a.name: m.RevisionObservation(1, 1, True)}, "local"), now
    ).status
    md = {**md_b, "status": md["status"]}
    weights = {rev_a.name: 100, rev_b.name: 0}
    t, bad_at, bad_requests = 0.0, None, 0
    while t < 3600:
        obs = m.Observed(
            rev_b,
            {
                n: m.RevisionObservation(1, 1, True, counters=s.c.revision_counters())
                for n, s in sims.items()
            },
            "local",
        )
        decided = m.step(md, obs, now + datetime.timedelta(seconds=t))
        md["status"] = decided.status
        wait = 1.0
        for a in decided.actions:
            if isinstance(a, m.SetWeights):
                weights = dict(a.weights)
            elif isinstance(a, m.Requeue):
                wait = a.seconds
        st = decided.status
        if st.get("phase") in ("RolledBack", "Healthy") and "canary" not in st:
            return {
                "rolled_back": st["phase"] == "RolledBack",
                "detect_s": (t - bad_at) if bad_at is not None else None,
                "bad_requests": bad_requests,
                "virtual_s": t,
            }
        if (
            (bad_error_rate is not None or bad_latency is not None)
            and bad_at is None
            and weights.get(rev_b.name) == 10
            and any(r["phase"] == "Successful" for r in st.get("analysis") or [])
        ):
            bad_at = t
            if bad_error_rate is not None:
                sims[rev_b.name].error_rate = bad_error_rate
            if bad_latency is not None:
                sims[rev_b.name].latency = bad_latency
        wait = max(0.1, min(wait, 5.0))
        for name, sim in sims.items():
            before = sim.c.total
            sim.serve(rate * weights.get(name, 0) / 100, wait)
            if name == rev_b.name and bad_at is not None:
                bad_requests += sim.c.total - before
        t += wait
    return {"rolled_back": False, "detect_s": None, "bad_requests": bad_requests, "virtual_s": t}


def sim_baseline(
    rng: random.Random,
    rate: float,
    bad_error_rate: float | None,
    interval: float = 60.0,
    threshold: int = 5,
    iterations: int = 10,
    step_weight: int = 10,
    bad_latency: float | None = None,
    max_checks: int = 30,
) -> dict:
    """Flagger's default analysis in virtual time: checks every interval, rollback at threshold."""
    canary = SimRevision(rng, 0.005)
    failed, t, bad_at, bad_requests = 0, 0.0, None, 0
    weight = step_weight
    bad = bad_error_rate is not None or bad_latency is not None
    for check in range(max_checks if bad else iterations):
        if bad and check == 1 and bad_at is None:
            bad_at = t
            if bad_error_rate is not None:
                canary.error_rate = bad_error_rate
            if bad_latency is not None:
                canary.latency = bad_latency
        before = canary.c.revision_counters()
        canary.serve(rate * weight / 100, interval)
        after = canary.c.revision_counters()
        if bad_at is not None:
            bad_requests += int(after.requests - before.requests)
        t += interval
        delta = an.interval(before, after)
        if delta and delta.requests > 0 and (1 - (delta.error_rate or 0)) < 0.99:
            failed += 1
        if failed >= threshold:
            return {
                "rolled_back": True,
                "detect_s": (t - bad_at) if bad_at is not None else None,
                "bad_requests": bad_requests,
            }
        if not bad and check == iterations // 2:
            weight = 50
    return {"rolled_back": False, "detect_s": None, "bad_requests": bad_requests}


# --- part 3: thin traffic, open- and closed-loop clients (issue 16) ------------------------------

# kubetune_server's real buckets (server-image/kubetune_server/metrics.py, the contract).
LAT_BOUNDS, TTFT_BOUNDS, TPOT_BOUNDS = LATENCY_BUCKETS, TTFT_BUCKETS, TPOT_BUCKETS
# A healthy request: time to first token plus decoding, whose length varies with the answer.
# Decoding = output tokens x the request's time per output token (TPOT): log-normal tokens
# (median 16) times a log-normal TPOT (median 5 ms, sigma TPOT_SIGMA: the
# spread batching gives a request's mean per-token time, wider than vLLM's serving benchmark
# shows at steady load), together the log-normal decode time of sigma 0.5 of earlier runs.
TTFT_MEDIAN, DECODE_MEDIAN = 0.02, 0.08
TOKENS_MEDIAN, TPOT_SIGMA = 16, 0.2
# Closed loop: CLIENTS callers, each waits THINK seconds after an answer; sized so that healthy
# revisions see ``rate`` requests/s in total.
CLIENTS = 4
# (ttft factor, decode factor, maxLatencyRatio, should it be rolled back?, TPOT sigma of both)
SCENARIOS = {
    "slow canary (latency x30)": (30.0, 30.0, None, True, TPOT_SIGMA),
    "slow decoding (decode x4, TTFT same)": (1.0, 4.0, None, True, TPOT_SIGMA),
    "1.5x slower canary, maxLatencyRatio 2": (1.5, 1.5, 2.0, False, TPOT_SIGMA),
    "healthy canary": (1.0, 1.0, None, False, TPOT_SIGMA),
    # The decoding-speed test's false alarms when per-request TPOT varies far more.
    "healthy canary, TPOT sigma 0.35": (1.0, 1.0, None, False, 0.35),
}


class _Server:
    """Cumulative counters of one revision with separate latency and TTFT histograms."""

    def __init__(self) -> None:
        self.lat = [0] * len(LAT_BOUNDS)
        self.ttft = [0] * len(TTFT_BOUNDS)
        self.tpot = [0] * len(TPOT_BOUNDS)
        self.total = 0

    def observe(self, latency: float, ttft: float, tpot: float) -> None:
        self.total += 1
        for i, b in enumerate(TPOT_BOUNDS):
            if tpot <= b:
                self.tpot[i] += 1
        for i, b in enumerate(LAT_BOUNDS):
            if latency <= b:
                self.lat[i] += 1
        for i, b in enumerate(TTFT_BOUNDS):
            if ttft <= b:
                self.ttft[i] += 1

    def counters(self) -> an.RevisionCounters:
        t = float(self.total)
        return an.RevisionCounters(
            t,
            0.0,
            an.Histogram(LAT_BOUNDS, tuple(float(c) for c in self.lat), t),
            an.Histogram(TTFT_BOUNDS, tuple(float(c) for c in self.ttft), t),
            pods=1,
            tpot=an.Histogram(TPOT_BOUNDS, tuple(float(c) for c in self.tpot), t),
        )


class EventTraffic:
    """Discrete-event clients in virtual time: open loop (Poisson) or closed loop (CLIENTS).

    A request is routed by the weights at the moment it is sent and counted by its server when
    it completes, like kubetune_server's /metrics; a closed-loop client waits for the answer.
    """

    def __init__(self, rng: random.Random, closed: bool, rate: float, factors: dict) -> None:
        import heapq

        self.heapq = heapq
        self.rng, self.closed, self.rate, self.factors = rng, closed, rate, factors
        self.servers = {name: _Server() for name in factors}
        self.routed = dict.fromkeys(factors, 0)
        mean = math.exp(math.log(TTFT_MEDIAN) + 0.3**2 / 2) + math.exp(
            math.log(DECODE_MEDIAN) + 0.5**2 / 2
        )
        self.think = max(0.0, CLIENTS / rate - mean)
        self.events: list[tuple[float, int, str, str]] = []
        self.seq = 0
        if closed:
            for _ in range(CLIENTS):
                self._push(rng.random() * CLIENTS / rate, "send", "")
        else:
            self._push(rng.expovariate(rate), "send", "")

    def _push(self, at: float, kind: str, data: str) -> None:
        self.seq += 1
        self.heapq.heappush(self.events, (at, self.seq, kind, data))

    def latency(self, name: str) -> tuple[float, float, float]:
        """(latency, time to first token, time per output token) of one request."""
        tf, df, sigma = self.factors[name]
        ttft = tf * self.rng.lognormvariate(math.log(TTFT_MEDIAN), 0.3)
        # The decode time's spread stays sigma 0.5 whatever part of it TPOT takes.
        tokens = self.rng.lognormvariate(math.log(TOKENS_MEDIAN), math.sqrt(0.5**2 - sigma**2))
        tpot = df * self.rng.lognormvariate(math.log(DECODE_MEDIAN / TOKENS_MEDIAN), sigma)
        return ttft + tokens * tpot, ttft, tpot

    def run_until(self, until: float, weights: dict[str, int]) -> None:
        names = [n for n in self.factors if weights.get(n, 0) > 0]
        w = [weights[n] for n in names]
        while self.events and self.events[0][0] <= until:
            at, _, kind, data = self.heapq.heappop(self.events)
            if kind == "send":
                name = self.rng.choices(names, w)[0]
                self.routed[name] += 1
                lat, ttft, tpot = self.latency(name)
                self._push(at + lat, "done", f"{name}|{lat}|{ttft}|{tpot}")
                if not self.closed:
                    self._push(at + self.rng.expovariate(self.rate), "send", "")
            else:
                name, lat, ttft, tpot = data.split("|")
                self.servers[name].observe(float(lat), float(ttft), float(tpot))
                if self.closed:
                    self._push(at + self.think, "send", "")


@contextlib.contextmanager
def previous_analysis():
    """The analysis before issue 16: every interval judged alone (Argo Rollouts' and Flagger's
    model), latency only as p95 at minSamples, no starvation evidence."""
    saved = an.sequential_latency, an.starvation
    an.sequential_latency = lambda *_a, **_k: []  # type: ignore[assignment]
    an.starvation = lambda *_a, **_k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        an.sequential_latency, an.starvation = saved


def sim_scenario(
    rng: random.Random, closed: bool, rate: float, scenario: str, baseline: bool = False
) -> dict:
    """One rollout of a canary that is like ``scenario`` from its first request."""
    tf, df, ratio, _bad, sigma = SCENARIOS[scenario]
    analysis: dict[str, Any] = {"interval": "10s", "minSamples": 20, "failureLimit": 1}
    if ratio is not None:
        analysis["thresholds"] = {"maxLatencyRatio": ratio}
    if baseline:
        analysis["poolWindow"] = "0s"
    mds = []
    for adapter in ("file:///models/a", "file:///models/b"):
        md = make_md(adapter, DEFAULT_STEPS)
        md["spec"]["rollout"]["analysis"] = analysis
        md["spec"]["rollout"]["progressDeadlineSeconds"] = 600
        mds.append(md)
    rev_a, rev_b = revision_of(mds[0]), revision_of(mds[1])
    traffic = EventTraffic(
        rng, closed, rate, {rev_a.name: (1.0, 1.0, sigma), rev_b.name: (tf, df, sigma)}
    )
    now = datetime.datetime(2026, 1, 1, tzinfo=UTC)
    md = {**mds[0]}
    md["status"] = m.step(
        md, m.Observed(rev_a, {rev_a.name: m.RevisionObservation(1, 1, True)}, "local"), now
    ).status
    md = {**mds[1], "status": md["status"]}
    weights = {rev_a.name: 100, rev_b.name: 0}
    t, first = 0.0, None
    with previous_analysis() if baseline else contextlib.nullcontext():
        while t < 900:
            traffic.run_until(t, weights)
            obs = m.Observed(
                rev_b,
                {
                    n: m.RevisionObservation(1, 1, True, counters=s.counters())
                    for n, s in traffic.servers.items()
                },
                "local",
            )
            decided = m.step(md, obs, now + datetime.timedelta(seconds=t))
            md["status"] = st = decided.status
            wait = 1.0
            for a in decided.actions:
                if isinstance(a, m.SetWeights):
                    weights = dict(a.weights)
                elif isinstance(a, m.Requeue):
                    wait = a.seconds
            if first is None and weights.get(rev_b.name, 0) > 0:
                first = t
            if st.get("phase") in ("RolledBack", "Healthy") and "canary" not in st:
                return {
                    "rolled_back": st["phase"] == "RolledBack",
                    "seconds": t - (first or 0.0),
                    "exposed": traffic.routed[rev_b.name],
                    "why": st.get("message", ""),
                }
            t += max(0.1, min(wait, 5.0))
    return {"rolled_back": False, "seconds": None, "exposed": traffic.routed[rev_b.name]}


def thin_traffic_section(args: argparse.Namespace) -> list[str]:
    """Issue 16's table: bad canaries caught (seconds, requests), healthy ones not rolled back."""
    rng = random.Random(args.seed + 16)
    t0 = time.perf_counter()
    rows = []
    for scenario, (_tf, _df, _ratio, bad, _sigma) in SCENARIOS.items():
        runs = args.thin_bad_runs if bad else args.sim_runs
        for closed in (True, False):
            for baseline in (False, True):
                n = runs if not baseline or bad else max(args.thin_bad_runs, runs // 4)
                got = [
                    sim_scenario(rng, closed, args.thin_rate, scenario, baseline) for _ in range(n)
                ]
                rows.append((scenario, closed, baseline, bad, got))
    wall = time.perf_counter() - t0
    out = [
        f"thin traffic (issue 16), virtual time ({wall:.0f}s wall): {args.thin_rate:g} req/s, "
        f"closed loop = {CLIENTS} clients that wait for each answer, open loop = Poisson; "
        "default steps (10%, 2 intervals, 50%, 2 intervals), interval 10s, minSamples 20, "
        "maxLatencyRatio 1.5 unless said; the canary is what the scenario says from its first request",
        "",
        "| scenario | clients | analysis | runs | rolled back | seconds first traffic -> weight 0 (rolled back) | requests to the canary |",
        "|---|---|---|---|---|---|---|",
    ]
    verdict_ok = True
    for scenario, closed, baseline, bad, got in rows:
        rb = [r for r in got if r["rolled_back"]]
        secs = [r["seconds"] for r in rb if r["seconds"] is not None]
        exposed = [float(r["exposed"]) for r in (rb if bad else got)]
        who = "previous (each interval alone)" if baseline else "kubetune (pooled, sequential)"
        out.append(
            f"| {scenario} | {'closed' if closed else 'open'} | {who} | {len(got)} | "
            f"{len(rb)} ({len(rb) / max(1, len(got)):.1%}) | {_fmt(secs)} | {_fmt(exposed)} |"
        )
        if not baseline:
            if bad:
                verdict_ok &= len(rb) == len(got) and (not closed or max(secs or [1e9]) <= 30)
            else:
                verdict_ok &= not rb
    out.append("")
    out.append(
        "goal (every bad canary at weight 0 within 30 s closed-loop, 0 false rollbacks): "
        + ("met" if verdict_ok else "NOT met")
    )
    return out


# --- reporting -----------------------------------------------------------------------------------


def _fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"median {statistics.median(values):.1f} (min {min(values):.1f}, max {max(values):.1f})"


async def thin_real_section(args: argparse.Namespace) -> list[str]:
    """Issue 16's scenarios over real HTTP on loopback, ours and the previous analysis."""
    out = [
        f"thin traffic (issue 16), real HTTP on loopback through the local router: "
        f"{args.thin_rate:g} req/s, closed loop = {CLIENTS} clients that wait for each answer, "
        "open loop = fixed schedule; default steps, interval 10s, minSamples 20, maxLatencyRatio "
        "1.5 unless said; the canary is what the scenario says from its first request; token "
        "scenarios: both fake servers generate tokens and export kubetune_server's Metrics (TTFT, "
        f"TPOT histograms); runs end at weight 0, at promotion, or after {THIN_REAL_CAP_S:.0f}s "
        f"(bad canaries) / {THIN_REAL_PASS_CAP_S:.0f}s (one that should pass)",
        "",
        "| scenario, real traffic | clients | analysis | runs | at weight 0 | promoted | "
        "seconds first traffic -> weight 0 | seconds first traffic -> promoted | "
        "requests the canary served |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario in args.thin_real_scenarios:
        if scenario not in THIN_REAL_SCENARIOS:
            scenario = next(k for k in THIN_REAL_SCENARIOS if k.startswith(scenario))
        for closed in (True, False):
            for baseline in (False, True):
                got = [
                    await real_thin_run(scenario, closed, baseline, args.thin_rate, 200 + i)
                    for i in range(args.thin_real_runs)
                ]
                secs = [r["seconds"] for r in got if r["seconds"] is not None]
                prom = [r["promoted"] for r in got if r["promoted"] is not None]
                who = (
                    "previous (each interval alone)"
                    if baseline
                    else "kubetune (pooled, sequential)"
                )
                cap = got[0]["cap"]
                out.append(
                    f"| {scenario} | {'closed' if closed else 'open'} | {who} | {len(got)} | "
                    f"{len(secs)} | {len(prom)} | {_fmt(secs) if secs else f'none within {cap:.0f}s'} | "
                    f"{_fmt(prom) if prom else f'none within {cap:.0f}s'} | "
                    f"{_fmt([float(r['served']) for r in got])} |"
                )
                print(out[-1], file=sys.stderr, flush=True)
                for r in got:
                    if r.get("why"):
                        print(f"  {scenario} {closed=} {baseline=}: {r['why']}", file=sys.stderr)
    return out


async def main_async(args: argparse.Namespace) -> str:
    if args.thin_real_only:
        return "\n".join(await thin_real_section(args))
    lines: list[str] = []
    say = lines.append

    ours_real = [
        await real_run("ours", args.rate, args.bad_error_rate, args.baseline_interval, 10 + i)
        for i in range(args.real_runs)
    ]
    healthy_real = [
        await real_run("healthy", args.rate, args.bad_error_rate, args.baseline_interval, 50 + i)
        for i in range(args.real_healthy_runs)
    ]
    base_real = [
        await real_run("baseline", args.rate, args.bad_error_rate, args.baseline_interval, 100 + i)
        for i in range(args.baseline_runs)
    ]

    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    ours_healthy = [sim_ours(rng, args.rate, None, DEFAULT_STEPS) for _ in range(args.sim_runs)]
    ours_bad = [
        sim_ours(rng, args.rate, args.bad_error_rate, HOLD_STEPS) for _ in range(args.sim_runs // 4)
    ]
    base_healthy = [sim_baseline(rng, args.rate, None) for _ in range(args.sim_runs)]
    base_bad = [
        sim_baseline(rng, args.rate, args.bad_error_rate) for _ in range(args.sim_runs // 4)
    ]
    slow = 0.05 * args.slow_factor
    ours_slow = [
        sim_ours(rng, args.rate, None, HOLD_STEPS, bad_latency=slow)
        for _ in range(args.sim_runs // 4)
    ]
    base_slow = [
        sim_baseline(rng, args.rate, None, bad_latency=slow) for _ in range(args.sim_runs // 4)
    ]
    sim_s = time.perf_counter() - t0

    o_det = [r["detect_s"] for r in ours_real if r["detect_s"] is not None]
    b_det = [r["detect_s"] for r in base_real if r["detect_s"] is not None]
    o_bad = [float(r["bad_requests"]) for r in ours_real if r["detect_s"] is not None]
    b_bad = [float(r["bad_requests"]) for r in base_real if r["detect_s"] is not None]
    scale = 60.0 / args.baseline_interval
    say(
        f"rate {args.rate:g} req/s through the local weighted router, canary at 10%, "
        f"bad = {args.bad_error_rate:.0%} 5xx; ours: interval 10s, minSamples 20, failureLimit 1"
    )
    say("")
    say(
        "| real traffic on loopback | runs | seconds bad -> weight 0 | requests to the bad canary |"
    )
    say("|---|---|---|---|")
    say(
        f"| kubetune (machine.step, fast failure) | {len(ours_real)} | {_fmt(o_det)} | {_fmt(o_bad)} |"
    )
    say(
        f"| baseline: success-rate check every {args.baseline_interval:g}s, threshold 5 | {len(base_real)} | "
        f"{_fmt(b_det)} | {_fmt(b_bad)} |"
    )
    if b_det:
        say(
            f"| baseline scaled to Flagger's default interval 1m | - | ~{statistics.median(b_det) * scale:.0f} | "
            f"~{statistics.median(b_bad) * scale:.0f} |"
        )
    h_fr = sum(bool(r.get("rolled_back")) for r in healthy_real)
    say(
        f"| kubetune, healthy canary through the default steps (interval 5s) | {len(healthy_real)} | "
        f"false rollbacks: {h_fr} | promoted in {_fmt([r['seconds'] for r in healthy_real if 'seconds' in r])} s |"
    )
    say("")
    o_fr = sum(r["rolled_back"] for r in ours_healthy)
    b_fr = sum(r["rolled_back"] for r in base_healthy)
    od = [r["detect_s"] for r in ours_bad if r["detect_s"] is not None]
    bd = [r["detect_s"] for r in base_bad if r["detect_s"] is not None]
    say(
        f"| virtual time ({sim_s:.1f}s wall) | healthy runs | false rollbacks | bad runs | seconds bad -> weight 0 |"
        " requests to the bad canary |"
    )
    say("|---|---|---|---|---|---|")
    say(
        f"| kubetune, default steps (10%, 2 intervals, 50%, 2 intervals) | {len(ours_healthy)} | {o_fr} "
        f"({o_fr / max(1, len(ours_healthy)):.1%}) | {len(ours_bad)} | {_fmt(od)} | "
        f"{_fmt([float(r['bad_requests']) for r in ours_bad])} |"
    )
    say(
        f"| baseline: Flagger default (1m, threshold 5, >= 99% success), 10 checks | {len(base_healthy)} | {b_fr} "
        f"({b_fr / max(1, len(base_healthy)):.1%}) | {len(base_bad)} | {_fmt(bd)} | "
        f"{_fmt([float(r['bad_requests']) for r in base_bad])} |"
    )
    say("")
    osd = [r["detect_s"] for r in ours_slow if r["detect_s"] is not None]
    bsd = [r["detect_s"] for r in base_slow if r["detect_s"] is not None]
    say(
        f"| slow canary (latency x{args.slow_factor:g}, no errors), virtual time | runs | caught | seconds slow -> weight 0 |"
    )
    say("|---|---|---|---|")
    say(
        f"| kubetune (p95 vs stable, maxLatencyRatio 1.5) | {len(ours_slow)} | {len(osd)} | {_fmt(osd)} |"
    )
    say(
        f"| baseline: success-rate only, 30 checks = 30 min (any catch is 0.5% error noise, "
        f"it has no latency check) | {len(base_slow)} | {len(bsd)} | "
        f"{_fmt(bsd) if bsd else 'never'} |"
    )
    say("")
    if o_det and b_det:
        say(
            f"ratio (real traffic, median time to weight 0): baseline / kubetune = "
            f"{statistics.median(b_det) / statistics.median(o_det):.1f}x at a {args.baseline_interval:g}s baseline "
            f"interval, ~{statistics.median(b_det) * scale / statistics.median(o_det):.0f}x against Flagger's 1m default"
        )
    if od and bd:
        say(
            f"ratio (virtual time, median): Flagger default / kubetune = {statistics.median(bd) / statistics.median(od):.0f}x"
        )
    target = bool(o_det) and max(o_det) < 30 and o_fr == 0 and h_fr == 0
    say(f"target (< 30 s to weight 0, no false rollbacks): {'met' if target else 'NOT met'}")
    if args.thin_real_runs:
        say("")
        lines.extend(await thin_real_section(args))
    if args.thin_bad_runs:
        say("")
        lines.extend(thin_traffic_section(args))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s through the router")
    parser.add_argument(
        "--bad-error-rate", type=float, default=0.3, help="share of 5xx once the canary goes bad"
    )
    parser.add_argument("--real-runs", type=int, default=3)
    parser.add_argument("--baseline-runs", type=int, default=1)
    parser.add_argument("--real-healthy-runs", type=int, default=2)
    parser.add_argument(
        "--baseline-interval", type=float, default=10.0, help="seconds (Flagger default: 60)"
    )
    parser.add_argument("--sim-runs", type=int, default=400)
    parser.add_argument(
        "--slow-factor", type=float, default=10.0, help="latency multiple of a slow canary"
    )
    parser.add_argument(
        "--thin-rate", type=float, default=16.0, help="req/s of the thin-traffic scenarios"
    )
    parser.add_argument(
        "--thin-bad-runs", type=int, default=50, help="runs per bad thin-traffic scenario (0: skip)"
    )
    parser.add_argument(
        "--thin-real-runs",
        type=int,
        default=1,
        help="real-traffic runs per thin scenario (0: skip)",
    )
    parser.add_argument(
        "--thin-real-scenarios",
        nargs="*",
        default=list(THIN_REAL_SCENARIOS),
        help="names (or name prefixes) of THIN_REAL_SCENARIOS to run over real HTTP",
    )
    parser.add_argument(
        "--thin-real-only",
        action="store_true",
        help="run only the thin-traffic real-HTTP part (skips parts 1, 2 and virtual time)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--no-record", action="store_true", help="do not append to bench/RESULTS.md"
    )
    args = parser.parse_args()
    started = time.time()
    report = asyncio.run(main_async(args))
    print(report)
    if not args.no_record:
        cmd = "python bench/canary_detection.py " + " ".join(sys.argv[1:])
        header = (
            f"\n## canary_detection ({datetime.datetime.now(UTC):%Y-%m-%d %H:%M} UTC)\n\n"
            f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"took {time.time() - started:.0f}s; command: `{cmd.strip()}`\n\n"
        )
        with RESULTS.open("a") as fh:
            if RESULTS.stat().st_size == 0:
                fh.write("# Benchmark results\n")
            fh.write(header + report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
