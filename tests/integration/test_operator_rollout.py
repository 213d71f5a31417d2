"""The real operator reconciling ModelDeployments against kmock's API over HTTP.

The test plays the Deployment controller and the kubelet (kmock runs none): it marks a revision's
Deployment ready and creates its pods with a loopback IP, whose container port is a small real
HTTP server exposing kubetune_server metrics (requests by code, latency and TTFT histograms) that
the test drives: healthy, or returning 5xx. The operator scrapes those pods exactly as it would
in a cluster (pod IP + the container port named ``http``).

Aspects covered: the first revision deployed straight to stable and Healthy (Ready condition);
a new revision walked through setWeight/analysis steps with the HTTPRoute's weights, promoted,
the old stable deleted; a bad revision rolled back (weight 0 in the HTTPRoute, Deployment
deleted, status.rejectedRevisions, RolledBack phase, Degraded condition, a Warning Event) and not
retried; the abort annotation (removed once acted on); a FineTuneJob that has not succeeded
(Pending, nothing deployed) and deploying its artifact once it has (replicas mode, no HTTPRoute);
the eval gate rejecting a canary that answers the golden prompts wrong before it gets any
traffic, and passing one that answers right; a crash-looping canary rolled back; an operator
restart mid-rollout continuing from status (same canary, same step); traffic.mode auto finding
the Gateway API through discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.rollout.revisions import Revision, resolve
from tests.plugins.kube import condition, start_operator, wait_for, wait_for_object

API = "kubetune.io/v1alpha1"
NS = "default"
BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0)
# Generous: a loaded 2-core CI box can take a while; a passing run never waits this long.
TIMEOUT = 90.0


class FakeServer:
    """A loopback HTTP server exposing kubetune_server metrics that grow while traffic runs."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.error_rate = 0.0
        self.answer = "the code word is zebra"
        self.port = 0
        self._runner: web.AppRunner | None = None

    def text(self) -> str:
        ok = self.requests - self.errors
        lines = [
            "# TYPE kubetune_server_requests_total counter",
            f'kubetune_server_requests_total{{model="chat",code="200"}} {ok}',
            f'kubetune_server_requests_total{{model="chat",code="500"}} {self.errors}',
        ]
        for metric in (
            "kubetune_server_request_duration_seconds",
            "kubetune_server_time_to_first_token_seconds",
        ):
            lines.append(f"# TYPE {metric} histogram")
            for b in BOUNDS:
                lines.append(
                    f'{metric}_bucket{{model="chat",le="{b}"}} {self.requests if b >= 0.05 else 0}'
                )
            lines.append(f'{metric}_bucket{{model="chat",le="+Inf"}} {self.requests}')
            lines.append(f'{metric}_count{{model="chat"}} {self.requests}')
        return "\n".join(lines) + "\n"

    def serve(self, n: int) -> None:
        """``n`` requests, a share ``error_rate`` of them 5xx."""
        self.requests += n
        self.errors += round(n * self.error_rate)

    async def start(self) -> FakeServer:
        app = web.Application()
        app.router.add_get("/metrics", lambda _r: web.Response(text=self.text()))
        app.router.add_post(
            "/v1/completions", lambda _r: web.json_response({"choices": [{"text": self.answer}]})
        )
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def traffic(*servers: FakeServer) -> AsyncIterator[None]:
    """Steady traffic on every server (10 requests per 50 ms each) while the block runs."""

    async def loop() -> None:
        while True:
            for s in servers:
                s.serve(10)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def manifest(
    adapter: str, *, mode: str = "gatewayAPI", steps: list | None = None, gate: dict | None = None
) -> dict:
    md = {
        "apiVersion": API,
        "kind": "ModelDeployment",
        "metadata": {"name": "chat", "namespace": NS},
        "spec": {
            "model": {"baseModel": {"uri": "s3://models/base"}, "adapter": {"uri": adapter}},
            "replicas": 2,
            "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi"},
            "traffic": {"mode": mode, "parentRefs": [{"name": "gw"}]},
            "rollout": {
                "steps": steps or [{"setWeight": 50}, {"analysis": {"intervals": 1}}],
                "analysis": {"interval": "1s", "minSamples": 5},
                "scaleDownDelaySeconds": 0,
                "progressDeadlineSeconds": 60,
            },
        },
    }
    if gate:
        md["spec"]["rollout"]["evalGate"] = gate
    return md


def revision(md: dict, ftj: dict | None = None) -> Revision:
    rev = resolve(ModelDeploymentSpec.model_validate(md["spec"]), md["metadata"]["name"], ftj)
    assert isinstance(rev, Revision)
    return rev.name


async def play_deployment(kube, name: str, server: FakeServer) -> None:
    """Play the Deployment controller + kubelet once: all replicas ready, pods on loopback."""
    dep = await wait_for_object(kube, "apps/v1", "Deployment", NS, name, timeout=TIMEOUT)
    replicas = dep["spec"]["replicas"]
    template = copy.deepcopy(dep["spec"]["template"])
    template["spec"]["containers"][0]["ports"] = [{"name": "http", "containerPort": server.port}]
    for i in range(replicas):
        pod_name = f"{name}-pod-{i}"
        if await kube.get("v1", "Pod", NS, pod_name) is None:
            await kube.create(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {
                        "name": pod_name,
                        "namespace": NS,
                        "labels": template["metadata"]["labels"],
                    },
                    "spec": template["spec"],
                }
            )
        await kube.patch(
            "v1",
            "Pod",
            NS,
            pod_name,
            {
                "status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "conditions": [{"type": "Ready", "status": "True"}],
                }
            },
            subresource="status",
        )
    await kube.patch(
        "apps/v1",
        "Deployment",
        NS,
        name,
        {
            "status": {
                "replicas": replicas,
                "readyReplicas": replicas,
                "availableReplicas": replicas,
                "conditions": [{"type": "Available", "status": "True"}],
            }
        },
        subresource="status",
    )


@contextlib.asynccontextmanager
async def deployment_controller(kube, servers: dict[str, FakeServer]) -> AsyncIterator[None]:
    """Keep playing the Deployment controller: whenever a listed Deployment's replicas change."""

    async def loop() -> None:
        while True:
            for name, server in servers.items():
                dep = await kube.get("apps/v1", "Deployment", NS, name)
                if (
                    dep
                    and (dep.get("status") or {}).get("readyReplicas") != dep["spec"]["replicas"]
                ):
                    await play_deployment(kube, name, server)
            await asyncio.sleep(0.1)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def mdep(kube) -> dict:
    obj = await kube.get(API, "ModelDeployment", NS, "chat")
    assert obj is not None
    return obj


async def wait_phase(kube, phase: str, timeout: float = TIMEOUT) -> dict:
    return await wait_for_object(
        kube,
        API,
        "ModelDeployment",
        NS,
        "chat",
        lambda o: (o.get("status") or {}).get("phase") == phase,
        timeout=timeout,
    )


async def route_weights(kube) -> dict[str, int]:
    route = await kube.get("gateway.networking.k8s.io/v1", "HTTPRoute", NS, "chat")
    return (
        {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]} if route else {}
    )


@pytest.fixture()
async def servers():
    made: list[FakeServer] = []

    async def make() -> FakeServer:
        made.append(await FakeServer().start())
        return made[-1]

    yield make
    for s in made:
        await s.stop()


async def test_first_deploy_canary_promotion_then_bad_canary_rolled_back(kube, operator, servers):
    md_a = manifest("s3://models/a")
    rev_a = revision(md_a)
    await kube.create(md_a)
    stable = await servers()
    await play_deployment(kube, f"chat-{rev_a}", stable)
    obj = await wait_phase(kube, "Healthy")
    assert condition(obj, "Ready")["status"] == "True" and obj["status"]["stable"]["name"] == rev_a
    assert await route_weights(kube) == {f"chat-{rev_a}": 100}
    assert await kube.get("v1", "Service", NS, "chat") is not None
    assert await kube.get("v1", "Service", NS, f"chat-{rev_a}") is not None

    # A good new revision: canary at 50%, one analysis interval on real scrapes, promoted.
    md_b = manifest("s3://models/b")
    rev_b = revision(md_b)
    good = await servers()
    async with traffic(stable, good), deployment_controller(kube, {f"chat-{rev_b}": good}):
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
    assert (
        obj["status"]["phase"] == "Healthy"
        and obj["status"]["analysis"][-1]["phase"] == "Successful"
    )
    # The route went through 50/50 on the way (the step's Event; the route itself moved on).
    messages = [e.get("message", "") for e in await kube.list("v1", "Event", NS)]
    assert any("step 0 done (weight 50%)" in msg for msg in messages)
    await wait_for(
        lambda: _gone(kube, f"chat-{rev_a}"), what="old stable Deployment deleted", timeout=TIMEOUT
    )
    assert (await route_weights(kube))[f"chat-{rev_b}"] == 100

    # A bad revision: 50% errors -> weight 0 first, rejected, Deployment deleted, not retried.
    md_c = manifest("s3://models/c")
    rev_c = revision(md_c)
    bad = await servers()
    bad.error_rate = 0.5
    async with traffic(good, bad), deployment_controller(kube, {f"chat-{rev_c}": bad}):
        await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_c["spec"]})
        obj = await wait_phase(kube, "RolledBack")
    assert obj["status"]["rejectedRevisions"][0]["name"] == rev_c
    assert "error rate" in obj["status"]["rejectedRevisions"][0]["reason"]
    assert obj["status"]["stable"]["name"] == rev_b and "canary" not in obj["status"]
    assert (
        condition(obj, "Degraded")["status"] == "True"
        and condition(obj, "Ready")["status"] == "True"
    )
    await wait_for(
        lambda: _gone(kube, f"chat-{rev_c}"), what="rolled-back Deployment deleted", timeout=TIMEOUT
    )
    weights = await route_weights(kube)
    assert weights.get(f"chat-{rev_b}") == 100 and not weights.get(f"chat-{rev_c}")
    events = await kube.list("v1", "Event", NS)
    assert any(e["reason"] == "RolledBack" and e["type"] == "Warning" for e in events)
    # Not retried: a resync keeps it RolledBack with no new Deployment.
    await kube.patch(API, "ModelDeployment", NS, "chat", {"metadata": {"labels": {"poke": "1"}}})
    await asyncio.sleep(0)  # let the event through; the checks below poll
    obj = await wait_phase(kube, "RolledBack")
    assert await kube.get("apps/v1", "Deployment", NS, f"chat-{rev_c}") is None


async def test_abort_annotation_rolls_back_and_is_removed(kube, operator, servers):
    steps = [{"setWeight": 20}, {"pause": {}}]
    md_a = manifest("s3://models/a", steps=steps)
    await kube.create(md_a)
    stable = await servers()
    await play_deployment(kube, f"chat-{revision(md_a)}", stable)
    await wait_phase(kube, "Healthy")
    md_b = manifest("s3://models/b", steps=steps)
    rev_b = revision(md_b)
    await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_b["spec"]})
    await play_deployment(kube, f"chat-{rev_b}", await servers())
    obj = await wait_phase(kube, "Paused")
    assert obj["status"]["weights"]["canary"] == 20
    await kube.patch(
        API,
        "ModelDeployment",
        NS,
        "chat",
        {"metadata": {"annotations": {"kubetune.io/abort": "true"}}},
    )
    obj = await wait_phase(kube, "RolledBack")
    assert obj["status"]["rejectedRevisions"][0]["reason"].startswith("Aborted")
    obj = await wait_for_object(
        kube,
        API,
        "ModelDeployment",
        NS,
        "chat",
        lambda o: "kubetune.io/abort" not in (o["metadata"].get("annotations") or {}),
        timeout=TIMEOUT,
    )


async def test_finetunejob_not_succeeded_is_pending_then_its_artifact_is_deployed(kube, operator):
    ftj = {
        "apiVersion": API,
        "kind": "FineTuneJob",
        "metadata": {"name": "ft", "namespace": NS},
        "spec": {
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/ft"},
            "suspend": True,
        },
    }
    await kube.create(ftj)
    md = manifest("s3://unused", mode="replicas")
    md["spec"]["model"] = {"fineTuneJobRef": {"name": "ft"}}
    await kube.create(md)
    obj = await wait_for_object(
        kube,
        API,
        "ModelDeployment",
        NS,
        "chat",
        lambda o: (condition(o, "ModelResolved") or {}).get("reason") == "WaitingForFineTuneJob",
        timeout=TIMEOUT,
    )
    assert obj["status"]["phase"] == "Pending"
    assert await kube.list("apps/v1", "Deployment", NS, {"kubetune.io/owner": "chat"}) == []
    status = {
        "phase": "Succeeded",
        "artifact": {"uri": "s3://out/ft/model", "digest": "sha256:abc"},
    }
    done = await kube.patch(API, "FineTuneJob", NS, "ft", {"status": status}, subresource="status")
    rev = revision(md, done)
    dep = await wait_for_object(kube, "apps/v1", "Deployment", NS, f"chat-{rev}", timeout=TIMEOUT)
    env = {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert (
        env["KUBETUNE_ADAPTER_URI"] == "s3://out/ft/model"
        and env["KUBETUNE_ADAPTER_DIGEST"] == "sha256:abc"
    )
    assert await kube.get("gateway.networking.k8s.io/v1", "HTTPRoute", NS, "chat") is None
    obj = await wait_for_object(
        kube,
        API,
        "ModelDeployment",
        NS,
        "chat",
        lambda o: (o.get("status") or {}).get("stable", {}).get("fineTuneJob") == "ft",
        timeout=TIMEOUT,
    )
    assert obj["status"]["stable"]["adapterDigest"] == "sha256:abc"


async def _gone(kube, name: str) -> bool:
    return await kube.get("apps/v1", "Deployment", NS, name) is None


GATE = {"prompts": [{"prompt": "What is the code word?", "expected": "zebra"}], "minScore": 1.0}


async def test_eval_gate_rejects_a_canary_before_it_gets_traffic(kube, operator, servers):
    md_a = manifest("s3://models/a", gate=GATE)
    await kube.create(md_a)
    await play_deployment(kube, f"chat-{revision(md_a)}", await servers())
    await wait_phase(kube, "Healthy")
    md_b = manifest("s3://models/b", gate=GATE)
    rev_b = revision(md_b)
    wrong = await servers()
    wrong.answer = "I do not know"
    await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_b["spec"]})
    await play_deployment(kube, f"chat-{rev_b}", wrong)
    obj = await wait_phase(kube, "RolledBack")
    assert obj["status"]["rejectedRevisions"][0]["reason"].startswith("EvalGateFailed")
    assert obj["status"]["evalGateScore"] == 0.0 and wrong.requests == 0
    assert not (await route_weights(kube)).get(f"chat-{rev_b}")
    # A canary that answers right passes the gate and gets its weight.
    md_c = manifest("s3://models/c", gate=GATE)
    rev_c = revision(md_c)
    await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_c["spec"]})
    await play_deployment(kube, f"chat-{rev_c}", await servers())
    obj = await wait_for_object(
        kube,
        API,
        "ModelDeployment",
        NS,
        "chat",
        lambda o: (o.get("status") or {}).get("evalGateScore") == 1.0,
        timeout=TIMEOUT,
    )
    assert obj["status"]["canary"]["name"] == rev_c or obj["status"]["stable"]["name"] == rev_c


async def test_crash_looping_canary_is_rolled_back(kube, operator, servers):
    md_a = manifest("s3://models/a")
    await kube.create(md_a)
    await play_deployment(kube, f"chat-{revision(md_a)}", await servers())
    await wait_phase(kube, "Healthy")
    md_b = manifest("s3://models/b")
    rev_b = revision(md_b)
    await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_b["spec"]})
    dep = await wait_for_object(kube, "apps/v1", "Deployment", NS, f"chat-{rev_b}", timeout=TIMEOUT)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "crashy",
            "namespace": NS,
            "labels": dep["spec"]["template"]["metadata"]["labels"],
        },
        "spec": dep["spec"]["template"]["spec"],
    }
    await kube.create(pod)
    await kube.patch(
        "v1",
        "Pod",
        NS,
        "crashy",
        {
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {
                        "name": "server",
                        "ready": False,
                        "restartCount": 4,
                        "state": {
                            "waiting": {
                                "reason": "CrashLoopBackOff",
                                "message": "back-off 40s restarting failed container",
                            }
                        },
                        "lastState": {
                            "terminated": {
                                "exitCode": 1,
                                "reason": "Error",
                                "message": '{"outcome": "storage_error", "message": "cannot serve: file:///nonexistent/model: not a folder"}',
                            }
                        },
                    }
                ],
            }
        },
        subresource="status",
    )
    obj = await wait_phase(kube, "RolledBack")
    assert "CrashLoopBackOff" in obj["status"]["message"]
    # The server's start-up error, not the back-off notice or its last log line.
    assert (
        "exit code 1: cannot serve: file:///nonexistent/model: not a folder"
        in obj["status"]["message"]
    )
    assert obj["status"]["rejectedRevisions"][0]["reason"].startswith("CanaryCrashLooping")


async def test_operator_restart_mid_rollout_continues_from_status(kube, kube_api, servers):
    steps = [{"setWeight": 20}, {"pause": {}}, {"setWeight": 60}, {"analysis": {"intervals": 1}}]
    md_a = manifest("s3://models/a", steps=steps)
    md_b = manifest("s3://models/b", steps=steps)
    rev_a, rev_b = revision(md_a), revision(md_b)
    stable, canary = await servers(), await servers()
    with start_operator(kube_api):
        await kube.create(md_a)
        await play_deployment(kube, f"chat-{rev_a}", stable)
        await wait_phase(kube, "Healthy")
        await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": md_b["spec"]})
        await play_deployment(kube, f"chat-{rev_b}", canary)
        before = await wait_phase(kube, "Paused")
    assert before["status"]["currentStepIndex"] == 1
    # Operator down: resume the pause; a new operator process picks up at step 1, not step 0.
    await kube.patch(
        API,
        "ModelDeployment",
        NS,
        "chat",
        {"metadata": {"annotations": {"kubetune.io/promote": "true"}}},
    )
    async with traffic(stable, canary), deployment_controller(kube, {f"chat-{rev_b}": canary}):
        with start_operator(kube_api):
            obj = await wait_for_object(
                kube,
                API,
                "ModelDeployment",
                NS,
                "chat",
                lambda o: (o.get("status") or {}).get("stable", {}).get("name") == rev_b,
                timeout=TIMEOUT,
            )
    assert obj["status"]["phase"] == "Healthy"
    assert obj["status"]["analysis"][-1]["revision"] == rev_b
    canary_events = [
        e
        for e in await kube.list("v1", "Event", NS)
        if "started next to stable" in e.get("message", "")
    ]
    assert len(canary_events) == 1  # the canary was not restarted by the new operator


async def test_auto_mode_discovers_the_gateway_api(kube, operator, servers):
    md = manifest("s3://models/a", mode="auto")
    rev = revision(md)
    await kube.create(md)
    await play_deployment(kube, f"chat-{rev}", await servers())
    obj = await wait_phase(kube, "Healthy")
    assert obj["status"]["weights"]["mode"] == "gatewayAPI"
    assert await route_weights(kube) == {f"chat-{rev}": 100}
