"""The rollout step kinds, one pure function each: ``(step spec, StepContext) -> Outcome``.

``decide`` dispatches on the kind a ``RolloutStep`` sets (exactly one: the API validates it).
A new step kind is a new module here, a field on ``api.modeldeployment.RolloutStep`` and one
line in ``decide``; the recipe (``rollout/machine.py``) folds its outcome like any other.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubetune.api.modeldeployment import RolloutStep
from kubetune.rollout.outcomes import Outcome, StepContext
from kubetune.rollout.steps import analysis, pause, set_weight


def decide(
    step: RolloutStep,
    ctx: StepContext,
    results: Sequence[Mapping[str, Any]] = (),
    inconclusive_limit: int = 0,
) -> Outcome:
    """The outcome of one step of ``spec.rollout.steps`` (``results``: analysis at this step)."""
    if step.set_weight is not None:
        return set_weight.decide(step.set_weight, ctx)
    if step.pause is not None:
        return pause.decide(step.pause, ctx)
    assert step.analysis is not None
    return analysis.decide(step.analysis, ctx, results, inconclusive_limit)
