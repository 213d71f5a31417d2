"""The status parts derived at the end of each step, alone: ``rollout.status``.

Aspects covered: Ready follows the stable revision (False with ScaledToZero at zero replicas,
StableNotReady when it has no available pods); Progressing is True while Progressing or Paused;
Degraded is True when Degraded or RolledBack; status.weights reports what the replica split
achieves and warns when it is far from the request; nothing serving: no weights.
"""

from __future__ import annotations

import pytest

from kubetune.api import phases
from kubetune.api.conditions import Reason, get_condition
from kubetune.rollout import status
from kubetune.rollout import weights as wt


def conds(phase: str, reason: str, *, stable: str | None = "chat-a", available: bool = True):
    got = status.conditions(
        [],
        phase=phase,
        reason=reason,
        message="why",
        stable=stable,
        stable_available=available,
        ts="2026-01-01T12:00:00.000Z",
        generation=3,
    )
    return {c["type"]: (c["status"], c["reason"]) for c in got}, got


@pytest.mark.parametrize(
    ("phase", "reason", "available", "ready", "progressing", "degraded"),
    [
        (phases.HEALTHY, Reason.STABLE_READY, True, "True", "False", "False"),
        (phases.PAUSED, Reason.CANARY_PAUSED, True, "True", "True", "False"),
        (phases.ROLLED_BACK, Reason.ANALYSIS_FAILED, True, "True", "False", "True"),
        (phases.DEGRADED, Reason.STABLE_NOT_READY, False, "False", "False", "True"),
        (phases.SCALED_TO_ZERO, Reason.SCALED_TO_ZERO, False, "False", "False", "False"),
    ],
)
def test_conditions_follow_the_phase(phase, reason, available, ready, progressing, degraded):
    got, raw = conds(phase, reason, available=available)
    assert (got["Ready"][0], got["Progressing"][0], got["Degraded"][0]) == (
        ready,
        progressing,
        degraded,
    )
    assert get_condition(raw, "Ready")["observedGeneration"] == 3
    if phase == phases.SCALED_TO_ZERO:
        assert got["Ready"][1] == Reason.SCALED_TO_ZERO
    elif not available:
        assert got["Ready"][1] == Reason.STABLE_NOT_READY


def test_without_stable_ready_carries_the_steps_reason():
    got, _ = conds(phases.PENDING, Reason.WAITING_FOR_MODEL, stable=None, available=False)
    assert got["Ready"] == ("False", Reason.WAITING_FOR_MODEL)


def test_weights_report_what_the_replica_split_achieves():
    routed = {"chat-a": 90, "chat-b": 10}
    got = status.weights(wt.REPLICAS, routed, "chat-a", "chat-b", 10, {"chat-a": 1, "chat-b": 1})
    assert got["canary"] == 50 and got["stable"] == 50 and got["requestedCanary"] == 10
    assert got["mode"] == wt.REPLICAS and got["warning"]
    exact = status.weights(
        wt.GATEWAY_API, routed, "chat-a", "chat-b", 10, {"chat-a": 4, "chat-b": 1}
    )
    assert exact == {"stable": 90, "canary": 10, "mode": wt.GATEWAY_API, "requestedCanary": 10}
    assert status.weights(wt.REPLICAS, {}, None, None, 0, {}) is None
