"""Traffic weight arithmetic: how many canary pods a step needs, and what weight it really gets.

Two kinds of router exist (DESIGN.md, "Traffic"):

* **Exact routers** — a Gateway API HTTPRoute with weighted backendRefs, or the local runtime's
  weighted router. They split requests by the weight we write, whatever the pod counts. The
  canary is then sized to the traffic it takes (``ceil(replicas * weight / 100)``, at least
  one pod), like Argo Rollouts does with traffic routing: a 10% canary of a 20-replica model
  needs 2 pods, not 20.

* **Replica-proportional splitting** — no traffic router: one Service selects the pods of both
  revisions and kube-proxy spreads connections evenly over *ready* endpoints. The only knob is
  the number of canary pods, so the achieved weight is ``ready_canary / (ready_stable +
  ready_canary)`` and is often not what the step asked for (one stable pod and a 10% step can
  only ever give 50%). We keep stable at full size (it is never disturbed, so a rollback is
  instant) and add canary pods next to it; we do not let the canary outnumber stable (a 100%
  surge at most), so steps above 50% stay at 50% until promotion. Status shows the achieved
  weight, and a warning condition says when it is off by more than ``WEIGHT_TOLERANCE``.

Everything here is pure integer arithmetic, tested as tables in tests/unit/test_rollout_weights.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

GATEWAY_API = "gatewayAPI"
REPLICAS = "replicas"
LOCAL = "local"

# Routers that honour a written weight exactly (see the module docstring).
EXACT_MODES = frozenset({GATEWAY_API, LOCAL})

# Percentage points the achieved weight may differ from the requested one before status warns.
# Five points keeps the common "1 canary pod next to 9 stable ones for a 10% step" silent while
# flagging "1 canary next to 1 stable pod for a 10% step" (50%: five times what was asked).
WEIGHT_TOLERANCE = 5


def resolve_mode(requested: str, gateway_api_available: bool, has_parent_refs: bool) -> str:
    """The traffic mode to use: ``gatewayAPI`` or ``replicas``.

    ``auto`` picks the Gateway API only when the cluster serves HTTPRoute *and* the spec names a
    Gateway to attach to; an HTTPRoute without parentRefs would route nothing.
    """
    if requested == GATEWAY_API:
        return GATEWAY_API
    if requested == REPLICAS:
        return REPLICAS
    return GATEWAY_API if gateway_api_available and has_parent_refs else REPLICAS


def canary_replicas(mode: str, replicas: int, weight: int) -> int:
    """Canary pods needed for ``weight`` percent, with ``replicas`` stable pods (spec.replicas).

    Weight 0 still keeps one pod: a canary that is being evaluated (eval gate, or before its
    first setWeight) must be running to be evaluated. Weight 100 (promotion) is full size.
    """
    if weight >= 100:
        return max(replicas, 1)
    if weight <= 0:
        return 1
    if mode in EXACT_MODES:
        # Capacity proportional to traffic; ceil so a small weight never gets zero pods.
        return max(1, math.ceil(replicas * weight / 100))
    # Replica-proportional: c / (s + c) = w / 100  <=>  c = s * w / (100 - w). Round to the
    # nearest pod count, at least one, and never more than stable (see module docstring).
    wanted = round(replicas * weight / (100 - weight))
    return min(max(1, wanted), max(replicas, 1))


def achieved_canary_weight(
    mode: str,
    configured: Mapping[str, int],
    canary: str | None,
    ready: Mapping[str, int],
) -> int:
    """The canary's share of traffic in percent, as the router really splits it.

    ``configured`` is what the router holds (revision -> weight, as reported back by the
    executor); ``ready`` counts ready pods per revision. Exact routers split by the configured
    weights (normalised, so a 1:3 split reads 25 even if the weights do not sum to 100) —
    except that a router cannot send traffic to a revision without ready pods. The replica
    mode splits by ready pods of the revisions the Service selects (configured weight > 0).
    """
    if canary is None or configured.get(canary, 0) <= 0:
        return 0
    live = {rev: w for rev, w in configured.items() if w > 0 and ready.get(rev, 0) > 0}
    if canary not in live:
        return 0
    if mode in EXACT_MODES:
        total = sum(live.values())
        return round(100 * live[canary] / total)
    total_ready = sum(ready.get(rev, 0) for rev in live)
    return round(100 * ready[canary] / total_ready)


def weight_warning(requested: int, achieved: int) -> str | None:
    """A message when the achieved weight is too far from the requested one, else None."""
    if abs(requested - achieved) <= WEIGHT_TOLERANCE:
        return None
    return (
        f"the canary gets {achieved}% of traffic, not the {requested}% the step asks for: "
        "with replica-proportional splitting the weight follows pod counts; add replicas or "
        "use the Gateway API (spec.traffic.mode: gatewayAPI) for exact weights"
    )


def traffic_weights(stable: str | None, canary: str | None, canary_weight: int) -> dict[str, int]:
    """The revision -> weight map a router is told for a stable/canary pair (sums to 100)."""
    weights: dict[str, int] = {}
    if stable is not None and stable != canary:
        weights[stable] = 100 - canary_weight if canary is not None else 100
    if canary is not None:
        weights[canary] = canary_weight if stable is not None and stable != canary else 100
    return weights
