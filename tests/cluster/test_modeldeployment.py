"""A ModelDeployment on a real control plane: canary through a real HTTPRoute, rollback, GC.

The chain: ModelDeployment -> the operator's Deployments -> the ReplicaSet controller's pods
-> the node runner runs the real inference server (its readiness probe decides Ready) -> the
EndpointSlice controller publishes the ready pods of each revision's Service. There is no
Gateway controller and no kube-proxy here, so the test is the data plane: :class:`Gateway`
reads the HTTPRoute's weighted ``backendRefs`` and the EndpointSlices of those Services, and
sends each request to a ready pod of the backend it draws by weight, as a Gateway would. The
operator's analysis scrapes the same pods' ``/metrics`` by pod IP.

Covered: a promoted canary whose HTTPRoute weights change step by step; a faulty revision
rolled back with weight 0 first; the replica-split mode; deleting the ModelDeployment removes
everything it created; a settled HTTPRoute is not re-patched (read-and-compare apply against
the API server's defaulting).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from kubetune.api.common import API_VERSION
from kubetune.k8s.client import KubeClient
from tests.cluster.conftest import Release, storage_secret
from tests.cluster.controlplane import ControlPlane
from tests.cluster.test_finetunejob import FTJ, finetunejob
from tests.plugins.kube import wait_for, wait_for_object

MDEP = ("kubetune.io/v1alpha1", "ModelDeployment")
ROUTE = ("gateway.networking.k8s.io/v1", "HTTPRoute")


def modeldeployment(
    name: str,
    namespace: str,
    ftj: str,
    assets: dict[str, str],
    *,
    mode: str = "gatewayAPI",
    fault: bool = False,
) -> dict[str, Any]:
    server: dict[str, Any] = {
        "maxBatchSize": 8,
        "batchWaitMs": 5,
        "maxTokensLimit": 8,
        "requestTimeoutSeconds": 30,
    }
    if fault:
        server["env"] = [{"name": "KUBETUNE_FAULT_ERROR_RATE", "value": "0.6"}]
    traffic: dict[str, Any] = {"mode": mode}
    if mode == "gatewayAPI":
        traffic["parentRefs"] = [{"name": "inference-gateway"}]
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"fineTuneJobRef": {"name": ftj}, "name": name},
            "replicas": 1 if mode == "gatewayAPI" else 2,
            "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"},
            "server": server,
            "storage": {
                "endpoint": assets["endpoint"],
                "region": "us-east-1",
                "credentialsSecret": "s3-keys",
            },
            "traffic": traffic,
            "rollout": {
                "steps": [{"setWeight": 50}, {"analysis": {"intervals": 1}}],
                "analysis": {
                    "interval": "4s",
                    "minSamples": 5,
                    "failureLimit": 1,
                    "thresholds": {"maxErrorRate": 0.05, "maxLatencyRatio": 10.0},
                },
                "progressDeadlineSeconds": 300,
                "scaleDownDelaySeconds": 1,
            },
        },
    }


class Gateway:
    """The data plane a Gateway would be: HTTPRoute weights -> ready endpoints -> requests."""

    def __init__(
        self,
        kube: KubeClient,
        namespace: str,
        route: str | None,
        model: str,
        service: str | None = None,
    ) -> None:
        """``route`` an HTTPRoute to follow, or ``service`` one Service (what kube-proxy does)."""
        self.kube, self.namespace, self.route, self.model = kube, namespace, route, model
        self.service = service
        self.sent: Counter[str] = Counter()
        self.codes: Counter[tuple[str, int]] = Counter()
        self.weights_seen: list[dict[str, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random(7)

    async def backends(self) -> list[tuple[str, int]]:
        if self.route is None:
            return [(str(self.service), 100)]
        route = await self.kube.get(*ROUTE, self.namespace, self.route)
        if route is None:
            return []
        refs = route["spec"]["rules"][0]["backendRefs"]
        weights = {r["name"]: int(r.get("weight", 1)) for r in refs}
        if not self.weights_seen or self.weights_seen[-1] != weights:
            self.weights_seen.append(weights)
        return list(weights.items())

    async def endpoints(self, service: str) -> list[str]:
        slices = await self.kube.list(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            self.namespace,
            labels={"kubernetes.io/service-name": service},
        )
        out = []
        for piece in slices:
            port = next((p["port"] for p in piece.get("ports") or []), None)
            for ep in piece.get("endpoints") or []:
                if (ep.get("conditions") or {}).get("ready") and port:
                    out += [f"http://{addr}:{port}" for addr in ep["addresses"]]
        return out

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            backends: list[tuple[str, int]] = []
            refreshed = 0.0
            while True:
                if time.monotonic() - refreshed > 0.5:
                    backends = await self.backends()
                    refreshed = time.monotonic()
                live = [(name, w) for name, w in backends if w > 0]
                if not live:
                    await asyncio.sleep(0.2)
                    continue
                service = self._rng.choices([n for n, _ in live], weights=[w for _, w in live])[0]
                urls = await self.endpoints(service)
                if not urls:
                    await asyncio.sleep(0.1)
                    continue
                body = {"model": self.model, "prompt": "add 2 3", "max_tokens": 4}
                try:
                    async with session.post(
                        self._rng.choice(urls) + "/v1/completions",
                        json=body,
                        timeout=aiohttp.ClientTimeout(total=30),
                    ) as resp:
                        await resp.read()
                        self.codes[(service, resp.status)] += 1
                except (TimeoutError, aiohttp.ClientError):
                    self.codes[(service, 0)] += 1
                self.sent[service] += 1

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def route_weights(route: dict[str, Any]) -> dict[str, int]:
    """Backend Service -> weight of an HTTPRoute's first rule."""
    return {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}


def phase(obj: dict[str, Any]) -> str | None:
    return (obj.get("status") or {}).get("phase")


@pytest.fixture()
async def served_models(
    kubetune_release: Release,
    cluster_kube: KubeClient,
    cluster_namespace: str,
    cluster_assets: dict[str, str],
) -> str:
    """Two fine-tuned models (v1, v2) in a fresh namespace with the S3 Secret."""
    ns = cluster_namespace
    await cluster_kube.create(storage_secret(ns))
    for name in ("v1", "v2"):
        ftj = finetunejob(name, ns, cluster_assets, steps=6, gpus=0)
        ftj["spec"]["hyperparameters"]["seed"] = 1 if name == "v1" else 2
        await cluster_kube.create(ftj)
    for name in ("v1", "v2"):
        obj = await wait_for_object(
            cluster_kube, *FTJ, ns, name, lambda o: phase(o) in ("Succeeded", "Failed"), timeout=300
        )
        assert phase(obj) == "Succeeded", obj["status"].get("message")
    return ns


async def children(kube: KubeClient, ns: str, name: str) -> dict[str, list[str]]:
    labels = {"kubetune.io/owner": name}
    out = {}
    for api_version, kind in (
        ("apps/v1", "Deployment"),
        ("apps/v1", "ReplicaSet"),
        ("v1", "Pod"),
        ("v1", "Service"),
        ("policy/v1", "PodDisruptionBudget"),
        ROUTE,
    ):
        out[kind] = [
            o["metadata"]["name"] for o in await kube.list(api_version, kind, ns, labels=labels)
        ]
    return out


async def test_canary_through_httproute_promotes_then_a_faulty_revision_rolls_back(
    control_plane: ControlPlane,
    cluster_kube: KubeClient,
    served_models: str,
    cluster_assets: dict[str, str],
) -> None:
    ns, kube = served_models, cluster_kube
    await kube.create(modeldeployment("assistant", ns, "v1", cluster_assets))
    md = await wait_for_object(
        kube, *MDEP, ns, "assistant", lambda o: phase(o) == "Healthy", timeout=240
    )
    stable_v1 = md["status"]["stable"]["name"]
    assert md["status"]["weights"]["mode"] == "gatewayAPI"
    gateway = Gateway(kube, ns, "assistant", "assistant")
    gateway.start()
    try:
        # The settled route is not re-patched: read-and-compare against the API server's defaults.
        route = await kube.get(*ROUTE, ns, "assistant")
        await asyncio.sleep(0)  # (no timing assertion: the check below compares versions)
        md = await kube.get(*MDEP, ns, "assistant")
        await kube.patch(*MDEP, ns, "assistant", {"metadata": {"annotations": {"test/poke": "1"}}})
        await wait_for_object(
            kube, *MDEP, ns, "assistant",
            lambda o: o["metadata"]["resourceVersion"] != md["metadata"]["resourceVersion"],
        )  # fmt: skip
        assert (await kube.get(*ROUTE, ns, "assistant"))["metadata"]["resourceVersion"] == route[
            "metadata"
        ]["resourceVersion"]

        # v2: a canary at 50% through the HTTPRoute, analysed, promoted.
        await kube.patch(
            *MDEP, ns, "assistant", {"spec": {"model": {"fineTuneJobRef": {"name": "v2"}}}}
        )
        md = await wait_for_object(
            kube, *MDEP, ns, "assistant",
            lambda o: phase(o) in ("Healthy", "Degraded", "RolledBack") and o["status"]["stable"]["name"] != stable_v1,
            timeout=300,
        )  # fmt: skip
        assert phase(md) == "Healthy", md["status"].get("message")
        stable_v2 = md["status"]["stable"]["name"]
        canary_service = f"assistant-{stable_v2}"
        split = [w for w in gateway.weights_seen if 0 < w.get(canary_service, 0) < 100]
        assert split and split[0][canary_service] == 50, gateway.weights_seen
        # Promoted: the route then sends everything to the new stable (read, not sampled). The
        # operator records, then acts (docs/contracts.md): the status names the promotion
        # before the route is patched, so the route is awaited, not read once.
        route = await wait_for_object(
            kube, *ROUTE, ns, "assistant",
            lambda o: route_weights(o).get(canary_service) == 100, timeout=60,
        )  # fmt: skip
        final = route_weights(route)
        assert final[canary_service] == 100 and sum(final.values()) == 100, final
        assert gateway.codes[(canary_service, 200)] >= 5, gateway.codes

        # A faulty revision: caught by the analysis, weight 0 first, then rolled back.
        await kube.patch(
            *MDEP, ns, "assistant",
            {"spec": {"server": {"env": [{"name": "KUBETUNE_FAULT_ERROR_RATE", "value": "0.6"}]}}},
        )  # fmt: skip
        md = await wait_for_object(
            kube, *MDEP, ns, "assistant",
            lambda o: (o.get("status") or {}).get("rejectedRevisions"),
            timeout=300,
        )  # fmt: skip
        bad = md["status"]["rejectedRevisions"][-1]["name"]
        assert md["status"]["stable"]["name"] == stable_v2
        route = await wait_for_object(  # recorded first, then acted on (as above)
            kube, *ROUTE, ns, "assistant",
            lambda o: route_weights(o).get(f"assistant-{bad}", 0) == 0,
            timeout=60,
        )  # fmt: skip
        weights = route_weights(route)
        assert weights.get(f"assistant-{bad}", 0) == 0 and weights[canary_service] == 100, weights
        assert (
            gateway.codes[(f"assistant-{bad}", 500)] + gateway.codes[(f"assistant-{bad}", 503)] > 0
        ), gateway.codes
    finally:
        await gateway.stop()

    # Deleting the ModelDeployment removes everything it created.
    assert any((await children(kube, ns, "assistant")).values())
    await kube.delete(*MDEP, ns, "assistant")

    async def gone() -> bool:
        return not any((await children(kube, ns, "assistant")).values())

    await wait_for(
        gone, timeout=90, interval=0.5, what="garbage collection of the ModelDeployment's children"
    )


async def test_replica_split_mode_rolls_a_canary_out(
    control_plane: ControlPlane,
    cluster_kube: KubeClient,
    served_models: str,
    cluster_assets: dict[str, str],
) -> None:
    ns, kube = served_models, cluster_kube
    await kube.create(modeldeployment("split", ns, "v1", cluster_assets, mode="replicas"))
    md = await wait_for_object(
        kube, *MDEP, ns, "split", lambda o: phase(o) == "Healthy", timeout=240
    )
    stable_v1 = md["status"]["stable"]["name"]
    assert md["status"]["weights"]["mode"] == "replicas"
    # The shared Service selects every revision's pods: its EndpointSlice is the split, and
    # the traffic spreads over its ready endpoints as kube-proxy would spread it.
    gateway = Gateway(kube, ns, None, "split", service="split")
    gateway.start()
    await kube.patch(*MDEP, ns, "split", {"spec": {"model": {"fineTuneJobRef": {"name": "v2"}}}})
    seen_both = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        md = await kube.get(*MDEP, ns, "split")
        slices = await kube.list(
            "discovery.k8s.io/v1",
            "EndpointSlice",
            ns,
            labels={"kubernetes.io/service-name": "split"},
        )
        ready = [
            e
            for s in slices
            for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready")
        ]
        pods = {
            p["status"].get("podIP"): p["metadata"]["labels"].get("kubetune.io/revision")
            for p in await kube.list("v1", "Pod", ns, labels={"kubetune.io/owner": "split"})
        }
        revisions = {pods.get(a) for e in ready for a in e["addresses"]}
        seen_both = seen_both or len(revisions - {None}) >= 2
        if phase(md) == "Healthy" and md["status"]["stable"]["name"] != stable_v1:
            break
        await asyncio.sleep(0.5)
    await gateway.stop()
    assert phase(md) == "Healthy" and md["status"]["stable"]["name"] != stable_v1, md["status"]
    assert seen_both, "the shared Service never had ready endpoints of both revisions"
