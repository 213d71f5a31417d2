"""The eval gate (``spec.rollout.evalGate``): golden prompts against the canary before any traffic.

Not a step of ``spec.rollout.steps``: it runs once per canary, after its pods are ready and
before the first step. The runtime runs the prompts when ``machine.eval_gate_due`` says so and
passes the scores as ``Observed.eval_gate``; until they arrive the canary waits (and rolls back
at the progress deadline). The verdict is ``evalgate.verdict``.
"""

from __future__ import annotations

from kubetune.api.conditions import Reason
from kubetune.api.modeldeployment import EvalGate
from kubetune.rollout import evalgate
from kubetune.rollout.outcomes import WAIT_REQUEUE, Advance, Rollback, StepContext, Wait


def decide(
    gate: EvalGate, got: evalgate.EvalGateObservation | None, ctx: StepContext
) -> Advance | Wait | Rollback:
    """Advance on a passing score, roll back on a failing one, wait for the runtime's scores."""
    if got is None or got.revision != ctx.canary or got.canary_score is None:
        detail = f": {got.error}" if got is not None and got.error else ""
        return Wait(
            f"eval gate: golden prompts against canary {ctx.canary}{detail}",
            WAIT_REQUEUE,
            stall=True,
        )
    why = evalgate.verdict(gate, got)
    if why:
        return Rollback(Reason.EVAL_GATE_FAILED, why)
    return Advance(
        f"eval gate passed: score {got.canary_score:.0%} on {got.prompts} golden prompts"
    )
