"""What one rollout step decides: typed outcomes the machine's recipe folds into the status.

Each step kind (``rollout/steps/``) is a pure function ``(step spec, StepContext) -> Outcome``.
It never touches the status or the action list: it says what should happen, and the recipe
(``machine._Run.fold``) does it the same way for every kind, the way Argo Rollouts' canary
reconciler turns each step into "complete", "wait" or "pause" and acts in one place.

- ``Advance``: the step is done; go to the next one (optionally at a new canary weight).
- ``Wait``: not done yet; hold the canary at its size and come back after ``requeue`` seconds,
  rolling back when the step made no progress within progressDeadlineSeconds (``stall``).
- ``Pause``: hold until a person acts (promote or abort annotation); phase Paused.
- ``Rollback``: take the canary out of traffic and reject its revision, with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

# Requeue periods (seconds).
STEADY_REQUEUE = 30.0
WAIT_REQUEUE = 2.0


@dataclass(frozen=True)
class StepContext:
    """What a step function may look at: the canary now, the clock and the person's intent."""

    index: int  # the step's position in spec.rollout.steps
    elapsed: float  # seconds since the step started (status.stepStartedAt)
    canary: str  # the canary revision's name
    canary_weight: int  # the canary weight requested so far in this reconcile
    ready: int  # the canary's ready pods
    mode: str  # resolved traffic mode (weights.GATEWAY_API, REPLICAS, LOCAL)
    replicas: int  # spec.replicas
    check_period: float  # how often a partial analysis interval is re-checked
    promote: bool = False  # kubetune.io/promote is set: skip what waits for a person
    # The previous status was already Paused: an event announcing the pause is not repeated.
    was_paused: bool = False


@dataclass(frozen=True)
class Advance:
    """The step is done: go to the next one."""

    why: str
    # setWeight: the canary weight from now on (a new traffic mix: a new analysis interval).
    weight: int | None = None
    # The canary's size the step needs (None: keep the size for the current weight).
    size: int | None = None
    # The step was skipped through the promote annotation, which is one-shot: remove it.
    consumes_promote: bool = False


@dataclass(frozen=True)
class Wait:
    """The step is not done yet: phase Progressing with ``message``, requeue, keep the canary."""

    message: str
    # Seconds until the next look; None when background analysis already asked for one.
    requeue: float | None
    size: int | None = None
    # Roll back when the step made no progress within progressDeadlineSeconds.
    stall: bool = False
    # The step is neither paused nor waiting for a person any more (status.paused cleared).
    unpause: bool = False
    # Run the analysis of the canary now even though it takes no traffic (weight 0).
    analyse: bool = False


@dataclass(frozen=True)
class Pause:
    """Hold the canary at this step until a person acts; phase Paused."""

    reason: str
    message: str
    requeue: float
    size: int | None = None
    # Tell it with a Warning event (once: not when the previous status was already Paused).
    warn: bool = False


@dataclass(frozen=True)
class Rollback:
    """Take the canary out of traffic and reject its revision."""

    reason: str
    message: str


Outcome = Advance | Wait | Pause | Rollback
