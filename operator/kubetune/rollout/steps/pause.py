"""``pause``: hold the canary for a duration, or until a person promotes it.

Also the pause annotation (``kubetune.io/pause``), which holds whatever step is current. While
the canary takes traffic, the machine comes back every check period (background analysis may
still fail it fast); at weight 0 there is nothing to check, so it waits longer.
"""

from __future__ import annotations

from kubetune.api.common import ANNOTATION_PAUSE, ANNOTATION_PROMOTE
from kubetune.api.conditions import Reason
from kubetune.api.modeldeployment import PauseStep
from kubetune.rollout.analysis import parse_duration
from kubetune.rollout.outcomes import STEADY_REQUEUE, Advance, Pause, StepContext, Wait


def decide(step: PauseStep, ctx: StepContext) -> Advance | Wait | Pause:
    """A timed pause waits out its duration; an indefinite one waits for the promote annotation."""
    if step.duration:
        left = parse_duration(step.duration) - ctx.elapsed
        if left <= 0:
            return Advance("pause over")
        if ctx.promote:
            return Advance("pause over", consumes_promote=True)
        return Wait(
            f"pausing {step.duration} at step {ctx.index}",
            min(left, ctx.check_period) if ctx.canary_weight else left,
        )
    if ctx.promote:
        return Advance("resumed through the promote annotation", consumes_promote=True)
    return Pause(
        Reason.CANARY_PAUSED,
        f"paused at step {ctx.index} until {ANNOTATION_PROMOTE}=true",
        ctx.check_period if ctx.canary_weight else STEADY_REQUEUE,
    )


def held(ctx: StepContext) -> Pause:
    """The pause annotation holds the current step, whatever its kind."""
    return Pause(
        Reason.CANARY_PAUSED,
        f"paused through the {ANNOTATION_PAUSE} annotation at step {ctx.index}",
        STEADY_REQUEUE if ctx.canary_weight == 0 else ctx.check_period,
    )
