"""``analysis``: hold until this many analysis intervals passed at this step.

The intervals themselves are judged in the background on every check period while the canary
takes traffic (``machine._Run.analyse``, statistics in ``rollout/analysis.py``); this step only
counts the verdicts recorded since it started. Intervals too thin to judge (Inconclusive, or an
Error reading the figures) in a row: after ``inconclusiveLimit`` of them the rollout pauses for
a person; with limit 0 it keeps waiting for traffic until the progress deadline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kubetune.api.common import ANNOTATION_ABORT, ANNOTATION_PROMOTE
from kubetune.api.conditions import Reason
from kubetune.api.modeldeployment import AnalysisStep
from kubetune.rollout import analysis as an
from kubetune.rollout.outcomes import Advance, Pause, StepContext, Wait


def decide(
    step: AnalysisStep,
    ctx: StepContext,
    results: Sequence[Mapping[str, Any]],
    inconclusive_limit: int,
) -> Advance | Wait | Pause:
    """Count the verdicts at this step (``results``, oldest first) against ``step.intervals``."""
    passed = sum(1 for r in results if r["phase"] == an.SUCCESSFUL)
    if passed >= step.intervals:
        return Advance(f"{passed} successful analysis intervals")
    streak = inconclusive_streak(results)
    if ctx.promote:
        return Advance("analysis skipped through the promote annotation", consumes_promote=True)
    if inconclusive_limit and streak >= inconclusive_limit:
        return Pause(
            Reason.ANALYSIS_INCONCLUSIVE,
            f"{streak} inconclusive analysis intervals at step {ctx.index}; "
            f"set {ANNOTATION_PROMOTE}=true to continue or {ANNOTATION_ABORT}=true to roll back",
            ctx.check_period,
            warn=not ctx.was_paused,
        )
    return Wait(
        f"analysis at step {ctx.index}: {passed}/{step.intervals} intervals passed",
        None,  # the background analysis asks for its own next look
        unpause=True,
        # Thin traffic is no progress: the deadline rolls back a canary nobody can judge.
        stall=bool(streak),
        # At weight 0 no background analysis runs: judge the canary here.
        analyse=ctx.canary_weight == 0,
    )


def inconclusive_streak(results: Sequence[Mapping[str, Any]]) -> int:
    """How many of the newest results in a row could not judge the canary."""
    streak = 0
    for r in reversed(results):
        if r["phase"] not in (an.INCONCLUSIVE, an.ERROR):
            break
        streak += 1
    return streak
