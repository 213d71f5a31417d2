"""The real operator following spec.replicas against kmock: the split, no reset, scale to zero.

kmock serves no ``/scale`` subresource (the cluster tier, tests/cluster/test_autoscaling.py,
drives the real one with ``kubectl scale`` and an HPA); here the test writes ``spec.replicas``
as the subresource would, and plays the Deployment controller as test_operator_rollout.py does.

Aspects covered:
- steady state: a new count reaches the stable Deployment; status.replicas reports the
  Deployment's pods and status.selector the serving pods' labels;
- mid-rollout (Gateway API, 50% step, paused): scaling up and down resizes stable and canary
  together (the canary keeps its share), and later reconciles keep the count written;
- spec.replicas 0 mid-rollout: the canary is stopped and deleted, not rejected; stable goes to
  0 pods; phase ScaledToZero with Ready=False and Progressing=False (RolloutNeedsReplicas).
"""

from __future__ import annotations

import math

from tests.integration import test_operator_rollout
from tests.integration.test_operator_rollout import (
    API,
    NS,
    TIMEOUT,
    _gone,
    deployment_controller,
    manifest,
    play_deployment,
    revision,
    wait_phase,
)
from tests.plugins.kube import condition, wait_for, wait_for_object

servers = test_operator_rollout.servers  # the FakeServer factory fixture, shared


async def replicas_of(kube, name: str) -> int | None:
    dep = await kube.get("apps/v1", "Deployment", NS, name)
    return dep["spec"]["replicas"] if dep else None


async def scale(kube, replicas: int) -> None:
    """What ``PUT .../scale`` does: write spec.replicas (the generation goes up)."""
    await kube.patch(API, "ModelDeployment", NS, "chat", {"spec": {"replicas": replicas}})


async def sizes_become(kube, want: dict[str, int]) -> None:
    async def probe() -> bool:
        return {n: await replicas_of(kube, n) for n in want} == want

    await wait_for(probe, timeout=TIMEOUT, interval=0.1, what=f"Deployment sizes {want}")


async def test_spec_replicas_drives_stable_and_canary_and_zero_stops_the_rollout(
    kube, operator, servers
) -> None:
    steps = [{"setWeight": 50}, {"pause": {}}]
    md_a = manifest("s3://models/a", steps=steps)
    stable = f"chat-{revision(md_a)}"
    await kube.create(md_a)
    server = await servers()
    async with deployment_controller(kube, {stable: server}):
        await play_deployment(kube, stable, server)
        obj = await wait_phase(kube, "Healthy")
        assert obj["status"]["replicas"] == 2
        assert obj["status"]["selector"] == (
            "kubetune.io/component=server,kubetune.io/kind=ModelDeployment,kubetune.io/owner=chat"
        )
        await scale(kube, 5)
        await sizes_become(kube, {stable: 5})
        await wait_for_object(
            kube, API, "ModelDeployment", NS, "chat",
            lambda o: (o.get("status") or {}).get("replicas") == 5, timeout=TIMEOUT,
        )  # fmt: skip

    md_b = manifest("s3://models/b", steps=steps)
    canary = f"chat-{revision(md_b)}"
    canary_server = await servers()
    async with deployment_controller(kube, {stable: server, canary: canary_server}):
        await kube.patch(
            API, "ModelDeployment", NS, "chat", {"spec": {"model": md_b["spec"]["model"]}}
        )
        await wait_phase(kube, "Paused")  # at the pause step, 50% to the canary
        await sizes_become(kube, {stable: 5, canary: math.ceil(5 * 0.5)})
        for replicas in (8, 2):
            await scale(kube, replicas)
            await sizes_become(kube, {stable: replicas, canary: math.ceil(replicas * 0.5)})
        # Later reconciles (a poke, and the canary's own requeues) keep what was written.
        await kube.patch(
            API, "ModelDeployment", NS, "chat", {"metadata": {"labels": {"poke": "1"}}}
        )
        obj = await wait_for_object(
            kube, API, "ModelDeployment", NS, "chat",
            lambda o: (o.get("status") or {}).get("observedGeneration") == o["metadata"]["generation"],
            timeout=TIMEOUT,
        )  # fmt: skip
        assert obj["spec"]["replicas"] == 2
        assert {
            stable: await replicas_of(kube, stable),
            canary: await replicas_of(kube, canary),
        } == {
            stable: 2,
            canary: 1,
        }

        await scale(kube, 0)
        obj = await wait_phase(kube, "ScaledToZero")
        await wait_for(lambda: _gone(kube, canary), what="stopped canary deleted", timeout=TIMEOUT)
        await sizes_become(kube, {stable: 0})
    assert "canary" not in obj["status"] and not obj["status"].get("rejectedRevisions")
    assert condition(obj, "Ready")["status"] == "False"
    assert condition(obj, "Ready")["reason"] == "ScaledToZero"
    progressing = condition(obj, "Progressing")
    assert progressing["status"] == "False" and progressing["reason"] == "RolloutNeedsReplicas"
    assert "a canary needs stable pods" in obj["status"]["message"]
