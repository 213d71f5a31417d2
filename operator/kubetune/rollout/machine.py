"""The ModelDeployment rollout state machine: ``step(md, observed, now) -> Step``.

One pure decision function shared by the operator and the local runtime (docs/contracts.md,
"Shared Python interfaces"). It takes the object (metadata, spec, the status written by the
previous step), what the runtime observed right now (the resolved model source, each revision's
readiness and cumulative metric counters) and the time, and returns the complete new status
plus the actions to take, in the order to take them. Everything the machine needs to remember
lives in ``status`` (the canary, the step index, when it started, the analysis baseline, the
revisions being retired), so an operator restart mid-rollout simply continues, and replaying the
same input gives the same output (idempotent on Kopf's ADDED replays).

The recipe (``_Run.run``; reads like Argo Rollouts' ``rolloutCanary()``). Each step kind of
``spec.rollout.steps`` is a pure function in ``rollout/steps/`` returning an outcome
(``rollout/outcomes.py``: advance, wait, pause, roll back) that ``_Run.fold`` carries out in one
place; the working state is ``rollout/state.RolloutState``, written to status once; the analysis
books are ``rollout/intervals.py`` and its statistics ``rollout/analysis.py``; the conditions
and applied weights are derived at the end (``rollout/status.py``). docs/design.md has the map.

1. Resolve the model. Nothing resolvable and nothing serving: Pending (or Degraded when the
   FineTuneJob failed). A canary whose desired revision went away is retired.
2. No stable yet: the first revision is deployed straight as stable.
3. Desired revision == stable: steady state, Healthy when available.
4. Desired revision was rejected before: hold at stable, phase RolledBack, until the spec changes.
5. ``spec.replicas`` 0 (scaled to zero): phase ScaledToZero, no pods. A canary needs stable pods
   to be compared with, so a new revision waits (a running canary is stopped, not rejected) and
   starts once the count is raised again.
6. Otherwise canary: start it (or restart it when the spec changed mid-rollout), wait for its
   pods, then walk the steps. Analysis runs in the background on every interval while the canary
   takes traffic; analysis steps wait for N successful intervals. Failure, crash-looping pods, a
   progress deadline or an abort annotation roll back: weight 0 FIRST, then the pods go after
   ``scaleDownDelaySeconds``. After the last step the canary is scaled to full size, then
   promoted: it becomes stable, the old stable's weight goes to 0, then its pods go.

Fast failure: a pass needs a whole interval, but a failure does not. Between intervals the
machine re-checks the partial interval every ``check period`` and fails early when the evidence
is already conclusive (``analysis.fast_failure``: 99% certain, or the sequential latency test).

Scalers: ``spec.replicas`` is written by people and by scalers alike (``kubectl scale``, an HPA
or a KEDA ScaledObject through the scale subresource). The machine never writes it; it derives
every Deployment's size from it on each step (stable: the count itself; canary: its share, see
``weights.canary_replicas``), so a new count reaches both revisions at the next reconcile and
nothing resets it. ``status.replicas`` (the stable revision's pods now) and ``status.selector``
(every serving pod) are what the scale subresource reports back.

Thin traffic: intervals too thin to judge are pooled (``analysisBaseline.pool``: the starts of
the consecutive inconclusive intervals at this step, bounded by ``analysis.poolWindow``), so the
next verdict is judged on all their samples; the progress deadline quotes the last analysis.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from kubetune.api import conditions as cond
from kubetune.api import phases
from kubetune.api.actions import Event, Requeue
from kubetune.api.common import ANNOTATION_ABORT, ANNOTATION_PAUSE, ANNOTATION_PROMOTE
from kubetune.api.conditions import Reason
from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.api.times import format_time, parse_time
from kubetune.rollout import analysis as an
from kubetune.rollout import builders, intervals
from kubetune.rollout import status as derived
from kubetune.rollout import steps as steps_
from kubetune.rollout import weights as wt
from kubetune.rollout.actions import (
    Action,
    DeleteRevision,
    EnsureRevision,
    RemoveAnnotation,
    SetWeights,
    Step,
    with_orphans_deleted,
)
from kubetune.rollout.builders import ROLE_CANARY, ROLE_STABLE
from kubetune.rollout.observed import Observed, RevisionObservation
from kubetune.rollout.outcomes import (
    STEADY_REQUEUE,
    WAIT_REQUEUE,
    Advance,
    Outcome,
    Pause,
    Rollback,
    StepContext,
    Wait,
)
from kubetune.rollout.revisions import ModelProblem, Revision, revision_from_status, revision_status
from kubetune.rollout.state import RolloutState
from kubetune.rollout.steps import eval_gate
from kubetune.rollout.steps import pause as pause_step

# How many analysis results status keeps (newest last); failureLimit counts within them.
MAX_ANALYSIS_RESULTS = 30
MAX_REJECTED = 10
FAST_FAIL_Z = an.FAST_FAIL_Z
# Event types.
NORMAL = "Normal"
WARNING = "Warning"


# The inputs (observed.py) and outputs (actions.py) are re-exported: callers say machine.X.
__all__ = [
    "Action",
    "DeleteRevision",
    "EnsureRevision",
    "Event",
    "Observed",
    "RemoveAnnotation",
    "Requeue",
    "RevisionObservation",
    "SetWeights",
    "Step",
    "eval_gate_due",
    "wilson_lower",
    "revision_from_status",
    "step",
]


# status.stable / status.canary records (kept here under their old names for callers).
_revision_status = revision_status


def wilson_lower(errors: float, total: float, z: float = FAST_FAIL_Z) -> float:
    """Lower Wilson bound at the fast-failure confidence (see ``analysis.wilson_lower``)."""
    return an.wilson_lower(errors, total, z)


# --- the machine ---------------------------------------------------------------------------


class _Run:
    """One step's working state: the status being built and the actions collected so far."""

    def __init__(self, md: Mapping[str, Any], observed: Observed, now: datetime.datetime) -> None:
        self.md = md
        self.meta = md.get("metadata") or {}
        self.name = self.meta["name"]
        self.generation = self.meta.get("generation")
        self.spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
        self.old = md.get("status") or {}
        # The working state, typed; turned into the status dict once, in finish().
        self.st = RolloutState.from_status(self.old)
        self.obs = observed
        self.now = now
        self.ts = format_time(now, millis=True)
        annotations = (
            observed.annotations
            if observed.annotations is not None
            else (self.meta.get("annotations") or {})
        )
        self.promote = (annotations.get(ANNOTATION_PROMOTE) or "").lower()
        self.abort = (annotations.get(ANNOTATION_ABORT) or "").lower() in ("true", "1", "yes")
        self.pause = (annotations.get(ANNOTATION_PAUSE) or "").lower() in ("true", "1", "yes")
        self.has_promote = self.promote in ("true", "1", "yes", "full")
        self.has_abort_annotation = ANNOTATION_ABORT in annotations
        self.has_promote_annotation = ANNOTATION_PROMOTE in annotations
        # Set when a step acted on the promote annotation (one-shot: it is removed then).
        self.consume_promote = False
        # Action buckets, concatenated in this order: scale up and create, route, scale down,
        # delete, tell. Weight changes always precede any scale-down or deletion.
        self.ups: list[Action] = []
        self.route: list[Action] = []
        self.downs: list[Action] = []
        self.deletes: list[Action] = []
        self.events: list[Action] = []
        self.requeues: list[float] = []
        self.phase = phases.PENDING
        self.reason = Reason.PENDING
        self.message = ""
        self.canary_weight = 0  # requested canary weight after this step
        self.interval = an.parse_duration(self.spec.rollout.analysis.interval)
        self.deadline = float(self.spec.rollout.progress_deadline_seconds)

    # --- the recipe ----------------------------------------------------------------------------

    def run(self) -> Step:
        """Resolve, then stable or canary, then the one status and the ordered actions."""
        model = self.obs.model
        if isinstance(model, ModelProblem):
            self.unresolved(model)
        else:
            self.st.conditions = cond.set_condition(
                self.st.conditions,
                cond.MODEL_RESOLVED,
                True,
                Reason.MODEL_RESOLVED,
                f"serving {model.adapter_uri or model.model_uri}",
                self.ts,
                self.generation,
            )
            stable = self.stable()
            rejected = {r["name"] for r in self.st.rejected_revisions}
            if stable is None:
                self.first_deploy(model)
            elif model.name == stable["name"]:
                self.cancel_canary("spec reverted to the stable revision")
                self.steady()
            elif model.name in rejected and (self.canary() or {}).get("name") != model.name:
                self.cancel_canary("spec changed to a rejected revision")
                self.hold_rejected(model)
            elif self.obs.traffic_problem:
                # No router: a canary could neither get traffic nor lose it. Hold at stable.
                self.cancel_canary("traffic routing is unavailable")
                self.steady()
            elif self.spec.replicas == 0 or self.waking_with_pending_revision():
                self.hold_for_stable_pods(model)
            else:
                self.canary_rollout(model)
            if self.obs.traffic_problem:
                self.say(
                    phases.DEGRADED,
                    Reason.TRAFFIC_UNAVAILABLE,
                    f"{self.obs.traffic_problem}; no canary is started until it is fixed",
                )
        self.consume_annotations()
        return self.finish()

    def canary_rollout(self, target: Revision) -> None:
        """Start (or restart) the canary, act on abort/failure/promote, analyse, walk the steps."""
        canary = self.canary()
        if canary is None or canary["name"] != target.name:
            self.start_canary(target, canary["name"] if canary else None)
        canary = self.canary()
        assert canary is not None
        self.canary_weight = int((self.st.weights or {}).get("requestedCanary") or 0)
        self.ensure_stable()
        obs = self.rev_obs(canary["name"])
        canary["readyReplicas"] = obs.ready_replicas

        if self.abort:
            self.rollback(Reason.ABORTED, f"aborted through the {ANNOTATION_ABORT} annotation")
            return
        if obs.failure:
            self.rollback(obs.failure_reason or Reason.CANARY_CRASHLOOP, obs.failure)
            return
        if self.promote == "full":
            self.finish_promotion(target, "promoted through the annotation")
            return

        # Background analysis: every interval while the canary takes traffic.
        if self.canary_weight > 0 and self.analyse(canary["name"]):
            return  # rolled back
        self.walk_steps(target, obs)
        canary = self.canary()
        if (
            canary is not None
            and self.canary_weight > 0
            and self.st.analysis_baseline is None
        ):
            # The weight changed in this step: the next interval starts now.
            self.rebaseline(canary["name"], (self.stable() or {}).get("name"))
            self.requeue(self.check_period())

    def walk_steps(self, target: Revision, obs: RevisionObservation) -> None:
        """Walk the rollout steps from the current index as far as they go in this step."""
        canary = self.canary()
        assert canary is not None
        steps = self.spec.rollout.steps
        idx = self.st.step_index
        if obs.ready_replicas < 1:
            canary["replicas"] = self.size_for(max(self.canary_weight, 0))
            self.ups.append(EnsureRevision(canary["name"], canary["replicas"], ROLE_CANARY, target))
            if self.since(self.st.canary_started_at) > self.deadline:
                self.rollback(
                    Reason.DEADLINE_EXCEEDED,
                    f"canary pods not ready within progressDeadlineSeconds ({int(self.deadline)}s)",
                )
                return
            self.progressing(f"waiting for canary {canary['name']} pods to be ready")
            self.requeue(WAIT_REQUEUE)
            return
        if not self.eval_gate_passed(target, obs):
            return

        while idx < len(steps):
            ctx = self.step_context(idx, obs)
            if self.pause and not self.has_promote:
                outcome: Outcome = pause_step.held(ctx)
            else:
                outcome = steps_.decide(
                    steps[idx],
                    ctx,
                    self.results_at_step(idx),
                    self.spec.rollout.analysis.inconclusive_limit,
                )
            self.fold(outcome, target)
            if not isinstance(outcome, Advance):
                return
            idx += 1
        self.finish_promotion(target, "all steps passed")

    def fold(self, outcome: Outcome, target: Revision) -> None:
        """Do what a step decided: the one place a step's outcome reaches status and actions."""
        canary = self.canary()
        assert canary is not None
        if isinstance(outcome, Rollback):
            self.rollback(outcome.reason, outcome.message)
            return
        if isinstance(outcome, Advance):
            if outcome.size is not None:
                canary["replicas"] = outcome.size
                self.ups.append(EnsureRevision(canary["name"], outcome.size, ROLE_CANARY, target))
            if outcome.weight is not None:
                self.canary_weight = outcome.weight
                self.st.analysis_baseline = None  # the traffic mix changed: new interval
            if outcome.consumes_promote:
                self.consume_promote = True
            self.advance(self.st.step_index, outcome.why)
            return
        # Wait and Pause hold the canary at its size (derived from spec.replicas every time).
        self.keep_canary_size(target, outcome.size)
        if isinstance(outcome, Pause):
            self.st.paused = True
            self.say(phases.PAUSED, outcome.reason, outcome.message)
            if outcome.warn:
                self.event(WARNING, outcome.reason, outcome.message)
            self.requeue(outcome.requeue)
            return
        if outcome.unpause:
            self.st.paused = None
        if outcome.stall and self.stalled():
            return
        self.progressing(outcome.message)
        if outcome.requeue is not None:
            self.requeue(outcome.requeue)
        if outcome.analyse:
            self.analyse(canary["name"])

    def finish(self) -> Step:
        stable = self.stable()
        canary = self.canary()
        stable_name = stable["name"] if stable else None
        canary_name = canary["name"] if canary else None
        weights = wt.traffic_weights(stable_name, canary_name, self.canary_weight)
        for r in self.st.retiring:
            weights.setdefault(r["name"], 0)
        if (stable_name or canary_name) and not self.obs.traffic_problem:
            self.route.append(
                SetWeights(
                    weights.get(stable_name or "", 0), weights.get(canary_name or "", 0), weights
                )
            )
        self.process_retiring()
        ready = {name: self.rev_obs(name).ready_replicas for name in weights}
        self.st.weights = derived.weights(
            self.mode, weights, stable_name, canary_name, self.canary_weight, ready
        )

        self.st.phase = self.phase
        self.st.message = self.message
        self.st.observed_generation = self.generation
        # The scale subresource's status half: the stable revision's pods now, and the selector
        # of every serving pod (an HPA averages pod metrics over them).
        self.st.replicas = self.rev_obs(stable_name).replicas if stable_name else 0
        self.st.selector = builders.scale_selector(self.md)
        self.set_conditions()
        new_status = self.st.to_status()
        actions: list[Action] = [*self.ups, *self.route, *self.downs, *self.deletes, *self.events]
        if self.requeues:
            actions.append(Requeue(round(min(self.requeues), 3)))
        return Step(new_status, actions)

    # --- the stable revision -------------------------------------------------------------------

    def unresolved(self, problem: ModelProblem) -> None:
        self.st.conditions = cond.set_condition(
            self.st.conditions,
            cond.MODEL_RESOLVED,
            False,
            problem.reason,
            problem.message,
            self.ts,
            self.generation,
        )
        self.cancel_canary("the desired model cannot be resolved")
        stable = self.stable()
        if stable is not None:
            self.ensure_stable()
        self.say(
            phases.DEGRADED if problem.terminal else phases.PENDING,
            problem.reason,
            problem.message
            + (f"; stable {stable['name']} keeps serving" if stable else "; nothing deployed"),
        )
        self.requeue(STEADY_REQUEUE)

    def cancel_canary(self, why: str) -> None:
        canary = self.canary()
        if canary is None:
            return
        self.st.retire(canary["name"], Reason.SUPERSEDED, self.ts)
        self.event(NORMAL, Reason.SUPERSEDED, f"canary {canary['name']} stopped: {why}")
        self.st.clear_canary()

    def ensure_stable(self) -> RevisionObservation:
        stable = self.stable()
        assert stable is not None
        src = (
            self.obs.model
            if isinstance(self.obs.model, Revision) and self.obs.model.name == stable["name"]
            else None
        )
        self.ups.append(
            EnsureRevision(
                stable["name"],
                self.spec.replicas,
                ROLE_STABLE,
                src or revision_from_status(stable, self.name),
            )
        )
        obs = self.rev_obs(stable["name"])
        stable["readyReplicas"] = obs.ready_replicas
        stable["replicas"] = self.spec.replicas
        return obs

    def first_deploy(self, target: Revision) -> None:
        self.st.stable = revision_status(target)
        if not self.old.get("stable"):
            self.st.step_started_at = self.ts
            self.event(
                NORMAL, Reason.DEPLOYING, f"deploying first revision {target.name} as stable"
            )
        self.steady()

    def steady(self) -> None:
        obs = self.ensure_stable()
        stable = self.stable()
        assert stable is not None
        if self.spec.replicas == 0:
            self.scaled_to_zero(stable["name"], obs)
            return
        waking = self.old.get("phase") == phases.SCALED_TO_ZERO
        if waking:
            # Scaled up from zero: the pods start like a first deploy's, Progressing within the
            # progress deadline (counted from now), not Degraded at once for being unready.
            self.st.step_started_at = self.ts
        first = waking or (
            not self.old.get("stable")
            or self.old.get("phase") in (None, phases.PENDING, phases.PROGRESSING)
            and not self.old.get("canary")
        )
        if obs.available:
            self.say(
                phases.HEALTHY,
                Reason.STABLE_READY,
                f"revision {stable['name']} serving ({obs.ready_replicas}/{self.spec.replicas} ready)",
            )
            if self.old.get("phase") != phases.HEALTHY and first:
                self.event(NORMAL, Reason.STABLE_READY, self.message)
            self.st.step_started_at = None
            self.requeue(STEADY_REQUEUE)
            return
        started = self.st.step_started_at
        if first and (obs.failure is None) and self.since(started) <= self.deadline:
            self.say(
                phases.PROGRESSING,
                Reason.DEPLOYING,
                f"waiting for revision {stable['name']} ({obs.ready_replicas}/{self.spec.replicas} ready)",
            )
            self.requeue(WAIT_REQUEUE)
            return
        detail = obs.failure or f"{obs.ready_replicas}/{self.spec.replicas} pods ready"
        self.say(
            phases.DEGRADED,
            obs.failure_reason or (Reason.DEADLINE_EXCEEDED if first else Reason.STABLE_NOT_READY),
            f"stable revision {stable['name']} is not available: {detail}",
        )
        if self.old.get("phase") != phases.DEGRADED:
            self.event(WARNING, self.reason, self.message)
        self.requeue(WAIT_REQUEUE * 5)

    def scaled_to_zero(self, stable: str, obs: RevisionObservation) -> None:
        """spec.replicas 0: the stable revision keeps its place but has no pods (ScaledToZero)."""
        stopping = f"; {obs.replicas} pods still stopping" if obs.replicas else ""
        self.say(
            phases.SCALED_TO_ZERO,
            Reason.SCALED_TO_ZERO,
            f"scaled to zero (spec.replicas 0): revision {stable} has no pods and serves nothing"
            f"{stopping}; scale up to serve (kubectl scale mdep {self.name} --replicas 1)",
        )
        self.st.step_started_at = None
        if self.old.get("phase") != phases.SCALED_TO_ZERO:
            self.event(NORMAL, Reason.SCALED_TO_ZERO, self.message)
        self.requeue(STEADY_REQUEUE)

    def waking_with_pending_revision(self) -> bool:
        """Scaled up from zero with a revision waiting, and stable has no ready pods yet."""
        return (
            self.canary() is None
            and _has_reason(self.old, Reason.ROLLOUT_NEEDS_REPLICAS)
            and not self.rev_obs((self.stable() or {}).get("name")).available
        )

    def hold_for_stable_pods(self, target: Revision) -> None:
        """A new revision while stable has no pods (scaled to zero, or just scaled up): wait.

        A canary is judged against stable; with no stable pods there is nothing to compare it
        with. A canary under way when the count drops to 0 is stopped (its pods go too: zero
        means zero), not rejected: it is not at fault, and its rollout starts over from the
        first step once stable serves again. Should stable fail to come back (Degraded at its
        deadline), the wait ends: the next step starts the canary, which may be the fix.
        """
        self.cancel_canary("scaled to zero (spec.replicas 0) during the rollout")
        self.steady()
        if self.phase == phases.DEGRADED:
            return
        if self.spec.replicas == 0:
            why = "its rollout starts when spec.replicas is above 0"
        else:
            why = "its rollout starts once the stable pods are ready"
        # The phase stays as stable's (Healthy, Progressing, ScaledToZero); the reason says why.
        self.say(
            self.phase,
            Reason.ROLLOUT_NEEDS_REPLICAS,
            f"{self.message}. Revision {target.name} waits: a canary needs stable pods to be "
            f"compared with, so {why}",
        )
        if not _has_reason(self.old, Reason.ROLLOUT_NEEDS_REPLICAS):
            self.event(NORMAL, Reason.ROLLOUT_NEEDS_REPLICAS, self.message)

    def hold_rejected(self, target: Revision) -> None:
        self.steady()
        rejected = next(r for r in self.st.rejected_revisions if r["name"] == target.name)
        if self.phase == phases.HEALTHY:
            self.say(
                phases.ROLLED_BACK,
                Reason.ROLLED_BACK,
                f"revision {target.name} was rolled back ({rejected['reason']}); "
                f"stable {self.stable()['name']} serves; change the spec to try again"
            )

    # --- transitions ---------------------------------------------------------------------------

    def start_canary(self, target: Revision, superseded: str | None) -> None:
        if superseded:
            self.st.retire(superseded, Reason.SUPERSEDED, self.ts)
            self.event(
                NORMAL,
                Reason.SUPERSEDED,
                f"canary {superseded} superseded by {target.name} (spec changed)",
            )
        self.st.unretire(target.name)
        self.st.canary = revision_status(target)
        self.st.current_step_index = 0
        self.st.canary_started_at = self.ts
        self.st.step_started_at = self.ts
        self.st.analysis_baseline = None
        self.st.paused = None
        self.st.eval_gate_score = None
        self.st.eval_gate_stable_score = None
        self.st.weights = {**(self.st.weights or {}), "requestedCanary": 0}
        self.event(
            NORMAL,
            Reason.CANARY_PROGRESSING,
            f"canary {target.name} started next to stable {self.stable()['name']}",
        )

    def rollback(self, reason: str, message: str) -> None:
        """Weight to 0 first (SetWeights below), then pods after the delay; record rejection."""
        canary = self.canary()
        assert canary is not None
        name = canary["name"]
        self.st.retire(name, Reason.ROLLED_BACK, self.ts)
        self.st.reject(name, f"{reason}: {message}", self.ts, MAX_REJECTED)
        self.st.clear_canary()
        self.canary_weight = 0
        self.event(WARNING, Reason.ROLLED_BACK, f"canary {name} rolled back ({reason}): {message}")
        stable = self.stable()
        assert stable is not None
        self.say(
            phases.ROLLED_BACK,
            reason,
            f"canary {name} rolled back: {message}; stable {stable['name']} serves all traffic",
        )

    def promote_canary(self, why: str) -> None:
        canary = self.canary()
        old = self.stable()
        assert canary is not None and old is not None
        self.st.stable = {
            k: v for k, v in canary.items() if k not in ("readyReplicas", "replicas")
        }
        self.st.retire(old["name"], Reason.PROMOTED, self.ts)
        self.st.clear_canary()
        self.canary_weight = 0
        self.event(
            NORMAL,
            Reason.PROMOTED,
            f"canary {canary['name']} promoted to stable ({why}); {old['name']} retired",
        )
        self.say(phases.HEALTHY, Reason.PROMOTED, f"revision {canary['name']} promoted ({why})")

    def finish_promotion(self, target: Revision, why: str) -> None:
        canary = self.canary()
        assert canary is not None
        obs = self.rev_obs(canary["name"])
        full = max(self.spec.replicas, 1)
        canary["replicas"] = full
        self.ups.append(EnsureRevision(canary["name"], full, ROLE_STABLE, target))
        if obs.ready_replicas < min(full, self.spec.replicas or 1):
            # Scale the canary to full size BEFORE it takes all traffic.
            self.st.current_step_index = len(self.spec.rollout.steps)
            if self.stalled():
                return
            self.progressing(f"scaling canary {canary['name']} to {full} pods before promotion")
            self.requeue(WAIT_REQUEUE)
            return
        if self.has_promote:
            self.consume_promote = True
        self.promote_canary(why)

    def process_retiring(self) -> None:
        delay = float(self.spec.rollout.scale_down_delay_seconds)
        keep = []
        for r in self.st.retiring:
            waited = self.since(r.get("zeroWeightSince"))
            if waited >= delay:
                self.deletes.append(DeleteRevision(r["name"], r.get("reason", "")))
                continue
            if self.mode not in wt.EXACT_MODES:
                # Replica splitting has no router: weight 0 means no pods behind the Service.
                self.downs.append(EnsureRevision(r["name"], 0, ROLE_CANARY))
            self.requeue(delay - waited)
            keep.append(r)
        self.st.retiring = keep

    # --- walking the steps ---------------------------------------------------------------------

    def step_context(self, idx: int, obs: RevisionObservation) -> StepContext:
        canary = self.canary()
        assert canary is not None
        return StepContext(
            index=idx,
            elapsed=self.since(self.st.step_started_at),
            canary=canary["name"],
            canary_weight=self.canary_weight,
            ready=obs.ready_replicas,
            mode=self.mode,
            replicas=self.spec.replicas,
            check_period=self.check_period(),
            promote=self.has_promote,
            was_paused=bool(self.old.get("paused")) and self.old.get("phase") == phases.PAUSED,
        )

    def results_at_step(self, idx: int) -> list[dict[str, Any]]:
        """This canary's analysis results recorded since the step ``idx`` started."""
        canary = (self.canary() or {}).get("name")
        started = parse_time(self.st.step_started_at) or self.now
        return [
            r
            for r in self.st.analysis
            if r.get("revision") == canary
            and r.get("step") == idx
            and (parse_time(r.get("time")) or self.now) >= started
        ]

    def eval_gate_passed(self, target: Revision, obs: RevisionObservation) -> bool:
        """The golden-prompt gate before any traffic: True once passed (or not configured)."""
        gate = self.spec.rollout.eval_gate
        if gate is None or self.st.eval_gate_score is not None:
            return True
        got = self.obs.eval_gate
        outcome = eval_gate.decide(gate, got, self.step_context(self.st.step_index, obs))
        if got is not None and got.canary_score is not None and not isinstance(outcome, Wait):
            self.st.eval_gate_score = round(got.canary_score, 4)
            if got.stable_score is not None:
                self.st.eval_gate_stable_score = round(got.stable_score, 4)
        if isinstance(outcome, Advance):
            # Not a step of spec.rollout.steps: the first step is still to come.
            self.event(NORMAL, Reason.CANARY_PROGRESSING, outcome.why)
            return True
        self.fold(outcome, target)
        return False

    def stalled(self) -> bool:
        """Roll back when the current step made no progress within the progress deadline.

        When analysis ran at this step, the message carries its last summary: the deadline is
        where a user looks first, and "no progress" alone hides a canary that was slow on too
        few samples to judge.
        """
        waited = self.since(self.st.step_started_at)
        if waited <= self.deadline:
            return False
        idx = self.st.current_step_index
        summary = self.analysis_summary()
        if summary:
            message = f"no verdict at step {idx} for {waited:.0f}s (progressDeadlineSeconds {int(self.deadline)}s): {summary}"
        else:
            message = (
                f"no progress at step {idx} within progressDeadlineSeconds ({int(self.deadline)}s)"
            )
        self.rollback(Reason.DEADLINE_EXCEEDED, message)
        return True

    def analysis_summary(self) -> str | None:
        """The last analysis at this step in one line (figures, samples, verdict); None if none."""
        here = self.results_at_step(self.st.step_index)
        return intervals.summary(here, self.spec.rollout.analysis.min_samples)

    def advance(self, idx: int, why: str) -> int:
        self.st.current_step_index = idx + 1
        self.st.step_started_at = self.ts
        self.st.paused = None
        self.event(NORMAL, Reason.CANARY_PROGRESSING, f"step {idx} done ({why})")
        return idx + 1

    def progressing(self, message: str) -> None:
        self.say(phases.PROGRESSING, Reason.CANARY_PROGRESSING, message)

    def size_for(self, weight: int) -> int:
        return wt.canary_replicas(self.mode, self.spec.replicas, weight)

    def keep_canary_size(self, target: Revision, size: int | None = None) -> None:
        # Derived from spec.replicas on every step, both ways: when a scaler changes the count
        # mid-rollout, the canary keeps its share of it (never more pods than the share needs).
        canary = self.canary()
        assert canary is not None
        if size is None:
            size = self.size_for(self.canary_weight)
        canary["replicas"] = size
        self.ups.append(EnsureRevision(canary["name"], size, ROLE_CANARY, target))

    def check_period(self) -> float:
        """How often the partial interval is re-checked for a fast failure."""
        return max(0.5, min(self.interval, self.interval / 5))

    # --- analysis ------------------------------------------------------------------------------

    def analyse(self, canary: str) -> bool:
        """Look at the current analysis interval (intervals.look); True when it rolled back."""
        spec = self.spec.rollout.analysis
        got = intervals.look(
            self.st.analysis_baseline,
            canary=canary,
            stable=(self.stable() or {}).get("name"),
            step=self.st.step_index,
            spec=spec,
            observed=self.obs,
            now=self.now,
            interval=self.interval,
            check_period=self.check_period(),
            expected_share=self.expected_share(),
        )
        if got.baseline is not None:
            self.st.analysis_baseline = got.baseline
        self.requeue(got.requeue)
        if got.result is None or got.verdict is None:
            return False
        verdict = got.verdict
        self.st.analysis = [*self.st.analysis, got.result][-MAX_ANALYSIS_RESULTS:]
        if verdict.phase != an.FAILED:
            return False
        failures = sum(
            1 for r in self.st.analysis if r.get("revision") == canary and r["phase"] == an.FAILED
        )
        if failures >= spec.failure_limit or verdict.early:
            # Early evidence is conclusive by construction: failureLimit guards against
            # one noisy interval, which a sequential test already accounts for.
            self.rollback(Reason.ANALYSIS_FAILED, verdict.message)
            return True
        self.event(
            WARNING,
            Reason.ANALYSIS_FAILED,
            f"analysis failed ({failures}/{spec.failure_limit}): {verdict.message}",
        )
        return False

    def expected_share(self) -> float | None:
        """The canary's share of requests that its applied weight promises (None: unknown)."""
        applied = (self.st.weights or {}).get("canary")
        weight = applied if applied is not None else self.canary_weight
        return weight / 100 if weight else None

    def rebaseline(self, canary: str, stable: str | None) -> None:
        self.st.analysis_baseline = intervals.baseline(
            self.obs, canary, stable, self.st.step_index, self.ts
        )

    # --- annotations and conditions ------------------------------------------------------------

    def consume_annotations(self) -> None:
        # abort is one-shot: acted on (a canary existed) or not, it must not hit the next canary.
        if self.has_abort_annotation:
            self.events.append(RemoveAnnotation(ANNOTATION_ABORT))
        # promote is one-shot when acted on; without a canary it is dropped too (same reason).
        if self.has_promote_annotation and (self.consume_promote or self.canary() is None):
            self.events.append(RemoveAnnotation(ANNOTATION_PROMOTE))

    def set_conditions(self) -> None:
        stable = (self.stable() or {}).get("name")
        self.st.conditions = derived.conditions(
            self.st.conditions,
            phase=self.phase,
            reason=self.reason,
            message=self.message,
            stable=stable,
            stable_available=bool(stable) and self.rev_obs(stable).available,
            ts=self.ts,
            generation=self.generation,
        )

    # --- small helpers -------------------------------------------------------------------------

    def say(self, phase: str, reason: str, message: str) -> None:
        """Where this step leaves the ModelDeployment: status.phase, the conditions' reason, why."""
        self.phase, self.reason, self.message = phase, reason, message

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def requeue(self, seconds: float) -> None:
        self.requeues.append(max(0.05, seconds))

    def since(self, text: str | None) -> float:
        start = parse_time(text)
        return (self.now - start).total_seconds() if start else 0.0

    def rev_obs(self, name: str | None) -> RevisionObservation:
        return self.obs.revisions.get(name or "", RevisionObservation())

    @property
    def mode(self) -> str:
        return self.obs.mode

    def stable(self) -> dict[str, Any] | None:
        return self.st.stable

    def canary(self) -> dict[str, Any] | None:
        return self.st.canary


def _has_reason(status: Mapping[str, Any], reason: str) -> bool:
    return any(c.get("reason") == reason for c in status.get("conditions") or [])


def step(md: Mapping[str, Any], observed: Observed, now: datetime.datetime) -> Step:
    """Decide one reconcile of a ModelDeployment (see the module docstring).

    ``md`` is the whole object (``metadata`` with name, generation and annotations; ``spec``;
    ``status`` as the previous step wrote it). ``now`` must be timezone-aware.
    """
    try:
        ModelDeploymentSpec.model_validate(md.get("spec") or {})
    except ValidationError as exc:
        return _invalid_spec(md, exc, now)
    return with_orphans_deleted(_Run(md, observed, now).run(), observed)


def eval_gate_due(md: Mapping[str, Any]) -> tuple[str, bool] | None:
    """``(canary revision, with_stable)`` when a runtime should run the eval gate now, else None.

    Due while a canary exists whose gate has not been scored yet and spec.rollout.evalGate is
    set; ``with_stable`` asks for stable's score too (maxScoreDrop). The runtime passes the
    result as ``Observed.eval_gate`` (the canary's pods must be ready to answer).
    """
    try:
        spec = ModelDeploymentSpec.model_validate(md.get("spec") or {})
    except ValidationError:
        return None
    gate = spec.rollout.eval_gate
    status = md.get("status") or {}
    canary = (status.get("canary") or {}).get("name")
    if gate is None or not canary or status.get("evalGateScore") is not None:
        return None
    return canary, gate.max_score_drop is not None


def _invalid_spec(md: Mapping[str, Any], exc: ValidationError, now: datetime.datetime) -> Step:
    # Nothing is touched: whatever serves keeps serving until the spec is fixed, so Ready stays
    # as it is while a stable revision serves.
    conds = [(cond.PROGRESSING, False), (cond.DEGRADED, True)]
    if not (md.get("status") or {}).get("stable"):
        conds.append((cond.READY, False))
    message = cond.invalid_spec_message(exc)
    status, events = cond.invalid_spec_status(
        md, message, format_time(now, millis=True), phases.DEGRADED, conds
    )
    actions: list[Action] = [*events]
    return Step(status, actions)
