"""The parts of a ModelDeployment's status derived at the end of every step (pure).

``conditions``: Ready, Progressing and Degraded from the phase, the reason and the message the
recipe settled on (Kubernetes condition semantics through ``api.conditions.set_condition``).
``weights``: ``status.weights``, the weights actually applied (replica splitting can only
approximate the requested one, and says so in ``warning``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune.api import conditions as cond
from kubetune.api import phases
from kubetune.api.conditions import Reason
from kubetune.rollout import weights as wt


def conditions(
    conds: list[dict[str, Any]],
    *,
    phase: str,
    reason: str,
    message: str,
    stable: str | None,
    stable_available: bool,
    ts: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """Ready, Progressing and Degraded for the step's outcome (the input list is not modified)."""
    if phase == phases.SCALED_TO_ZERO:
        ready = (False, Reason.SCALED_TO_ZERO, message)
    elif stable and stable_available:
        ready = (True, Reason.STABLE_READY, f"stable revision {stable} is available")
    else:
        ready = (False, reason if not stable else Reason.STABLE_NOT_READY, message)
    conds = cond.set_condition(conds, cond.READY, *ready, ts, generation)
    progressing = phase in (phases.PROGRESSING, phases.PAUSED)
    conds = cond.set_condition(
        conds, cond.PROGRESSING, progressing, reason, message, ts, generation
    )
    degraded = phase in (phases.DEGRADED, phases.ROLLED_BACK)
    return cond.set_condition(
        conds,
        cond.DEGRADED,
        degraded,
        reason if degraded else Reason.STABLE_READY,
        message if degraded else "",
        ts,
        generation,
    )


def weights(
    mode: str,
    routed: Mapping[str, int],
    stable: str | None,
    canary: str | None,
    requested: int,
    ready: Mapping[str, int],
) -> dict[str, Any] | None:
    """``status.weights``: what ``routed`` achieves with the ``ready`` pods (None: nothing serves)."""
    if not (stable or canary):
        return None
    achieved = wt.achieved_canary_weight(mode, routed, canary, ready)
    out: dict[str, Any] = {
        "stable": 100 - achieved if stable else 0,
        "canary": achieved,
        "mode": mode,
    }
    if canary:
        out["requestedCanary"] = requested
        warning = wt.weight_warning(requested, achieved) if requested else None
        if warning:
            out["warning"] = warning
    return out
