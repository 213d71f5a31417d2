"""``setWeight``: send this percentage of traffic to the canary.

The canary is first sized for the weight (``weights.canary_replicas``). With an exact router
(Gateway API, the local router) the weight moves only once those pods are ready: an exact
weight sent to pods that are not there yet would fail requests. Replica splitting has no
router, so the pods *are* the weight and the step is done at once.
"""

from __future__ import annotations

from kubetune.rollout import weights as wt
from kubetune.rollout.outcomes import WAIT_REQUEUE, Advance, StepContext, Wait


def decide(weight: int, ctx: StepContext) -> Advance | Wait:
    """Advance at ``weight`` once the canary has the pods for it; wait for them otherwise."""
    need = wt.canary_replicas(ctx.mode, ctx.replicas, weight)
    if ctx.mode in wt.EXACT_MODES and ctx.ready < need:
        return Wait(
            f"scaling canary to {need} pods for {weight}% (step {ctx.index})",
            WAIT_REQUEUE,
            size=need,
            stall=True,
        )
    return Advance(f"weight {weight}%", weight=weight, size=need)
