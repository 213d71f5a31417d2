"""Scalers and the rollout state machine: spec.replicas split between revisions, scale to zero.

``spec.replicas`` is written through the scale subresource by ``kubectl scale``, an HPA or a
KEDA ScaledObject; the machine derives every Deployment's size from it and never writes it.

Aspects covered:
- a new count (up and down) reaches the stable and the canary Deployments at the next step,
  mid-rollout too, in both traffic modes: the canary keeps its share (exact routers) or stays
  at most as large as stable (replica splitting); the same count is kept on every later step
  (the operator does not reset what a scaler wrote, and no action of the machine writes spec);
- status.replicas is the stable revision's pods as observed (what ``GET .../scale`` reports),
  status.selector selects every serving pod of the ModelDeployment;
- spec.replicas 0: a first revision and a serving one go ScaledToZero (Ready=False with reason
  ScaledToZero, an Event once), no pods; scaling up again is a start (Progressing within the
  progress deadline, counted from the scale-up), not Degraded;
- at zero a new revision does not start a canary (Progressing=False, RolloutNeedsReplicas, the
  message says why); a canary under way is stopped, not rejected; after scaling up the canary
  starts once stable's pods are ready; a stable that never comes back ends the wait;
- the CRD schema (defaults, minimum, CEL) accepts replicas 0, and the scale subresource's paths
  name fields of the generated schema.
"""

from __future__ import annotations

import pytest

from kubetune.api import crds
from kubetune.api.conditions import Reason
from kubetune.api.validation import validate_manifest
from kubetune.rollout import machine as m
from tests.unit.test_rollout_machine import (
    Sim,
    counters,
    healthy_stable,
    make_md,
    ready,
    revision_of,
)


def sizes(out: m.Step) -> dict[str, int]:
    """Revision -> replicas the step asks for (the last EnsureRevision per revision wins)."""
    return {a.revision: a.replicas for a in out.of(m.EnsureRevision)}


def conditions(status: dict) -> dict[str, dict]:
    return {c["type"]: c for c in status.get("conditions") or []}


def scale_to(sim: Sim, replicas: int) -> None:
    """What ``kubectl scale`` / an HPA does: spec.replicas changes, generation bumps."""
    md = {**sim.md, "spec": {**sim.md["spec"], "replicas": replicas}}
    sim.set_spec(md)


def canary_at_weight(sim: Sim, stable: str, weight_step_md: dict) -> str:
    """Start a canary of ``weight_step_md``'s revision and walk it to its first setWeight."""
    sim.set_spec(weight_step_md)
    canary = revision_of(sim.md).name
    sim.step()
    sim.revs[canary] = ready(4, counters(0))  # enough for any weight: sizes are what is tested
    out = sim.step()
    assert sim.status["canary"]["name"] == canary, sim.status
    assert out.status["weights"]["requestedCanary"] == 50
    return canary


def rollout_50() -> dict:
    return {
        "steps": [{"setWeight": 50}, {"pause": {}}],
        "analysis": {"interval": "10s", "minSamples": 20},
        "scaleDownDelaySeconds": 5,
        "progressDeadlineSeconds": 120,
    }


# --- the split follows spec.replicas, and nothing resets it ------------------------------------


@pytest.mark.parametrize(
    ("mode", "counts"),
    [
        # exact router: the canary holds ceil(replicas * 50%) pods next to a full stable
        ("gatewayAPI", [(4, 4, 2), (8, 8, 4), (2, 2, 1), (1, 1, 1)]),
        # replica splitting: c = s * 50 / 50, never more than stable
        ("replicas", [(4, 4, 4), (8, 8, 8), (2, 2, 2), (1, 1, 1)]),
    ],
)
def test_a_scaler_changing_replicas_mid_rollout_resizes_stable_and_canary(
    mode: str, counts: list[tuple[int, int, int]]
) -> None:
    sim = Sim(make_md(replicas=4, rollout=rollout_50(), mode=mode), mode=mode)
    stable = healthy_stable(sim)
    canary = canary_at_weight(
        sim, stable, make_md("s3://models/b", replicas=4, rollout=rollout_50(), mode=mode)
    )
    for replicas, want_stable, want_canary in counts:
        scale_to(sim, replicas)
        sim.revs[stable] = ready(replicas, counters(0))
        out = sim.step()
        assert sizes(out) == {stable: want_stable, canary: want_canary}, (replicas, out.actions)
        assert out.status["stable"]["replicas"] == want_stable
        assert out.status["canary"]["replicas"] == want_canary
        assert (
            out.status["phase"] == "Paused"
        )  # still at the pause step: a resize is no rollout event
        # The next steps keep the scaler's count: nothing resets it.
        for _ in range(3):
            sim.tick(1)
            again = sim.step()
            assert sizes(again) == {stable: want_stable, canary: want_canary}
            assert sim.md["spec"]["replicas"] == replicas


def test_the_machine_never_writes_spec_and_steady_state_follows_a_new_count() -> None:
    sim = Sim(make_md(replicas=2))
    stable = healthy_stable(sim)
    for replicas in (5, 3, 7):
        scale_to(sim, replicas)
        out = sim.step()
        assert sizes(out) == {stable: replicas}
        assert out.status["stable"]["replicas"] == replicas
        assert out.status["observedGeneration"] == sim.md["metadata"]["generation"]
        # Only these actions exist, and none of them writes the ModelDeployment's spec.
        assert all(
            isinstance(a, (m.EnsureRevision, m.SetWeights, m.Event, m.Requeue)) for a in out.actions
        ), out.actions
        assert revision_of(sim.md).name == stable  # a new count is never a new revision


def test_status_reports_the_stable_pods_and_a_selector_of_every_serving_pod() -> None:
    sim = Sim(make_md(replicas=4))
    stable = healthy_stable(sim)
    scale_to(sim, 6)
    # The Deployment has 4 pods so far (2 being created): status.replicas says 4, not 6.
    sim.revs[stable] = m.RevisionObservation(replicas=4, ready_replicas=4, available=True)
    out = sim.step()
    assert out.status["replicas"] == 4
    assert out.status["stable"]["replicas"] == 6  # desired
    assert out.status["selector"] == (
        "kubetune.io/component=server,kubetune.io/kind=ModelDeployment,kubetune.io/owner=chat"
    )
    sim.revs[stable] = ready(6)
    assert sim.step().status["replicas"] == 6


# --- scale to zero -------------------------------------------------------------------------


def test_first_revision_at_zero_replicas_is_scaled_to_zero_with_no_pods() -> None:
    sim = Sim(make_md(replicas=0))
    rev = revision_of(sim.md).name
    out = sim.step()
    assert sizes(out) == {rev: 0}
    assert out.status["phase"] == "ScaledToZero"
    assert out.status["replicas"] == 0
    ready_cond = conditions(out.status)["Ready"]
    assert ready_cond["status"] == "False" and ready_cond["reason"] == Reason.SCALED_TO_ZERO
    assert "kubectl scale mdep chat --replicas 1" in out.status["message"]
    assert conditions(out.status)["Degraded"]["status"] == "False"
    assert [e.reason for e in out.of(m.Event)].count(Reason.SCALED_TO_ZERO) == 1
    sim.tick(60)
    again = sim.step()
    assert again.status["phase"] == "ScaledToZero" and not again.of(m.Event)


def test_scale_to_zero_and_back_is_progressing_then_healthy_not_degraded() -> None:
    sim = Sim(make_md(replicas=2))
    stable = healthy_stable(sim)
    scale_to(sim, 0)
    sim.revs[stable] = m.RevisionObservation(replicas=2, ready_replicas=0)  # pods stopping
    out = sim.step()
    assert sizes(out) == {stable: 0}
    assert out.status["phase"] == "ScaledToZero"
    assert "2 pods still stopping" in out.status["message"]
    assert out.status["replicas"] == 2
    sim.revs[stable] = m.RevisionObservation()
    sim.tick(600)  # long after any deadline: the wake-up deadline counts from the scale-up
    scale_to(sim, 3)
    out = sim.step()
    assert sizes(out) == {stable: 3}
    assert out.status["phase"] == "Progressing", out.status["message"]
    assert conditions(out.status)["Degraded"]["status"] == "False"
    sim.tick(30)
    assert sim.step().status["phase"] == "Progressing"
    sim.revs[stable] = ready(3)
    out = sim.step()
    assert out.status["phase"] == "Healthy"
    assert conditions(out.status)["Ready"]["status"] == "True"


def test_scaled_up_pods_that_never_get_ready_are_degraded_at_the_deadline() -> None:
    sim = Sim(make_md(replicas=0))
    sim.step()
    scale_to(sim, 1)
    sim.step()
    sim.tick(121)  # progressDeadlineSeconds 120
    out = sim.step()
    assert out.status["phase"] == "Degraded"
    assert conditions(out.status)["Degraded"]["reason"] == Reason.DEADLINE_EXCEEDED


def test_a_new_revision_at_zero_starts_no_canary_and_says_why() -> None:
    sim = Sim(make_md(replicas=2))
    stable = healthy_stable(sim)
    scale_to(sim, 0)
    sim.revs[stable] = m.RevisionObservation()
    sim.step()
    sim.set_spec(make_md("s3://models/b", replicas=0))
    new = revision_of(sim.md).name
    out = sim.step()
    assert "canary" not in out.status
    assert new not in sizes(out) and sizes(out) == {stable: 0}
    assert out.status["phase"] == "ScaledToZero"
    progressing = conditions(out.status)["Progressing"]
    assert progressing["status"] == "False"
    assert progressing["reason"] == Reason.ROLLOUT_NEEDS_REPLICAS
    assert f"Revision {new} waits: a canary needs stable pods" in out.status["message"]
    assert [e.reason for e in out.of(m.Event)] == [Reason.ROLLOUT_NEEDS_REPLICAS]
    assert not sim.step().of(m.Event)  # said once

    # Scaled up: stable comes back first; the canary starts once its pods are ready.
    scale_to(sim, 2)
    out = sim.step()
    assert sizes(out) == {stable: 2} and "canary" not in out.status
    assert out.status["phase"] == "Progressing"
    assert "once the stable pods are ready" in out.status["message"]
    sim.revs[stable] = ready(2, counters(0))
    out = sim.step()
    assert out.status["canary"]["name"] == new
    assert out.status["currentStepIndex"] == 0


def test_scaling_to_zero_mid_rollout_stops_the_canary_without_rejecting_it() -> None:
    sim = Sim(make_md(replicas=4, rollout=rollout_50()))
    stable = healthy_stable(sim)
    canary = canary_at_weight(
        sim, stable, make_md("s3://models/b", replicas=4, rollout=rollout_50())
    )
    scale_to(sim, 0)
    out = sim.step()
    assert "canary" not in out.status
    assert not out.status.get("rejectedRevisions")
    assert [r["name"] for r in out.status["retiring"]] == [canary]
    assert sizes(out)[stable] == 0
    assert out.status["weights"]["canary"] == 0
    assert out.status["phase"] == "ScaledToZero"
    assert conditions(out.status)["Progressing"]["reason"] == Reason.ROLLOUT_NEEDS_REPLICAS
    sim.tick(6)  # scaleDownDelaySeconds 5: the canary's pods go too
    out = sim.step()
    assert [a.revision for a in out.of(m.DeleteRevision)] == [canary]


def test_a_stable_that_never_comes_back_ends_the_wait_and_the_canary_may_start() -> None:
    sim = Sim(make_md(replicas=0))
    stable = revision_of(sim.md).name
    sim.step()
    sim.set_spec(make_md("s3://models/b", replicas=0))
    sim.step()
    scale_to(sim, 1)
    sim.step()
    sim.tick(121)
    out = sim.step()
    assert out.status["phase"] == "Degraded" and "canary" not in out.status
    out = sim.step()
    assert out.status["canary"]["name"] == revision_of(sim.md).name != stable


def test_the_schema_accepts_zero_replicas_and_the_scale_paths_exist() -> None:
    md = make_md(replicas=0)
    md.update(apiVersion="kubetune.io/v1alpha1", kind="ModelDeployment")
    assert validate_manifest(md) == []
    crd = crds.modeldeployment_crd()
    version = crd["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    assert schema["spec"]["properties"]["replicas"]["minimum"] == 0
    assert schema["status"]["properties"]["replicas"]["type"] == "integer"
    assert schema["status"]["properties"]["selector"]["type"] == "string"
    with pytest.raises(ValueError, match="names no field"):
        crds._require_status_or_spec_field(schema["status"], schema["spec"], ".status.replicaCount")
