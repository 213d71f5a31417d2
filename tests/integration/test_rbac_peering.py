"""Several operator replicas (the chart's default, 2) with Kopf peering: exactly one works.

Two operators run in this process with the chart's exact arguments and environment
(``--peering=kubetune``, ``KUBETUNE_PEERING_OLDEST_FIRST``), as two pods of the Deployment
would, against one emulated API server.

Covers:
- both register in the ClusterKopfPeering the chart creates, the older with the higher priority
  (``kubetune.startup`` ranks peers by start time; Kopf would pause *both* on a tie);
- while both run, a FineTuneJob's Jobs are created once each: only the active peer reconciles
  (a second active peer would POST every Job twice, the second time getting 409);
- when the active peer exits (a rolling upgrade or a lost node), it leaves the peering and the
  standby takes over: a new FineTuneJob is reconciled.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from kubetune.k8s.client import KubeClient
from tests.integration.test_rbac_chart import (
    DATA_OK,
    TwoPortApi,
    chart_operator,
    finetunejob,
    kopf_peering_objects,
    render_chart,
)
from tests.plugins.kube import finish_job, wait_for, wait_for_object

NS = "team-p"


async def test_one_active_replica_and_failover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    objects = render_chart({})
    with TwoPortApi(str(tmp_path / "kubeconfig")) as api:
        kube = KubeClient(api.test_url)
        older = contextlib.ExitStack()
        newer = contextlib.ExitStack()
        try:
            for peering in kopf_peering_objects(objects):
                await kube.create(peering)

            async def peers(*names: str):
                obj = await kube.get("kopf.dev/v1", "ClusterKopfPeering", None, "kubetune")
                status = (obj or {}).get("status") or {}
                return status if all(n in status for n in names) else None

            older.enter_context(chart_operator(api, objects, monkeypatch, pod_id="kubetune-a"))
            await wait_for(lambda: peers("kubetune-a"), timeout=30, what="peer a registered")
            newer.enter_context(chart_operator(api, objects, monkeypatch, pod_id="kubetune-b"))
            status = await wait_for(
                lambda: peers("kubetune-a", "kubetune-b"), timeout=30, what="both peers"
            )
            assert status["kubetune-a"]["priority"] > status["kubetune-b"]["priority"]

            await kube.create(finetunejob("peer-1", NS))
            await wait_for_object(kube, "batch/v1", "Job", NS, "peer-1-validate", timeout=30)
            await finish_job(kube, NS, "peer-1-validate", message=DATA_OK)
            await wait_for_object(kube, "batch/v1", "Job", NS, "peer-1-train", timeout=30)
            posts = [
                p
                for m, p, _ in api.operator_calls()
                if m == "POST" and p.endswith(f"/namespaces/{NS}/jobs")
            ]
            assert len(posts) == 2, f"expected one POST per Job (one active peer), got {len(posts)}"

            older.close()  # the active pod goes away; it removes itself from the peering

            async def a_gone():
                obj = await kube.get("kopf.dev/v1", "ClusterKopfPeering", None, "kubetune")
                return "kubetune-a" not in ((obj or {}).get("status") or {})

            await wait_for(a_gone, timeout=30, what="peer a left the peering")
            await kube.create(finetunejob("peer-2", NS))
            await wait_for_object(kube, "batch/v1", "Job", NS, "peer-2-validate", timeout=30)
        finally:
            newer.close()
            older.close()
            await kube.close()
