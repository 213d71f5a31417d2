"""The FineTuneJob decision function: observations in, complete status and actions out (pure).

Both runtimes call it (docs/contracts.md, "Shared Python interfaces"): the operator observes
Jobs and Pods through the API, the local runtime observes its processes and writes Job-like
dicts; each executes the returned actions its own way. Nothing here does I/O.

``observe_job(job, pods)`` reduces a Job and its pods to a :class:`JobObservation`.
``plan(ftj, validate, train, now)`` returns a :class:`Plan`: the complete new ``status`` and a
list of actions (:class:`CreateJob`, :class:`DeleteJob`, :class:`Event`, :class:`Requeue`,
:class:`DeleteFineTuneJob`).

The reasoning is level-triggered (STYLE.md, rule 4): the plan is recomputed from scratch from
the FineTuneJob's own status plus what the children look like now, so running it twice, or
after a crash between "act" and "write status", converges instead of duplicating work:

- What must survive the children lives in the status: ``restarts`` (the attempt number),
  ``lastFailureTime`` (the backoff clock), ``dataReport`` (the validation result: the validate
  Job may be gone later), ``artifact``.
- The training Job carries the attempt it was created for (``kubetune.io/attempt``). A Job of an
  older attempt is stale (its deletion did not happen or has not finished): delete it, never
  count its failure twice.
- Phases are monotonic where it matters: Succeeded and Failed are final.

Callers write the status first, then act: a crash in between leaves a status that the next
plan reads back (e.g. ``restarts`` already counted, the stale Job deleted then).
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from kubetune.api import conditions as c
from kubetune.api.actions import Event, Requeue  # noqa: F401  (re-exported: part of Action)
from kubetune.api.conditions import Reason
from kubetune.api.defaults import PodDefaults
from kubetune.api.pods import PodTemplateError
from kubetune.api.times import format_time, parse_time
from kubetune.finetune import builders

# --- observations ----------------------------------------------------------------------------------

ABSENT, ACTIVE, SUCCEEDED, FAILED = "absent", "active", "succeeded", "failed"

# Observation reasons (normalised from pod/container/Job states).
PREEMPTED = Reason.PREEMPTED
EVICTED = "Evicted"
NODE_LOST = "NodeLost"
OOM_KILLED = Reason.OOM_KILLED
DATA_ERROR = Reason.DATA_ERROR
STORAGE_ERROR = Reason.STORAGE_ERROR
DEADLINE_EXCEEDED = "DeadlineExceeded"
ERROR = "Error"

# Termination-message outcome -> observation reason.
OUTCOME_REASONS = {
    "preempted": PREEMPTED,
    "oom": OOM_KILLED,
    "storage_error": STORAGE_ERROR,
    "data_error": DATA_ERROR,
    "config_error": DATA_ERROR,
}
# Never retried (docs/contracts.md: exit 2 = data/config error): the same input fails the same way.
NON_RETRYABLE_OUTCOMES = {"data_error", "config_error"}
EXIT_INPUT = 2
EXIT_STORAGE = 3
EXIT_PREEMPTED = 143
# Waiting reasons meaning the image cannot be pulled; after IMAGE_PULL_DEADLINE the job fails.
IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
IMAGE_PULL_DEADLINE = 300
# DisruptionTarget reasons (pod was killed from outside, not by its own failure).
DISRUPTION_REASONS = {
    "PreemptionByScheduler": PREEMPTED,
    "PreemptionByKubeScheduler": PREEMPTED,
    "EvictionByEvictionAPI": EVICTED,
    "DeletionByTaintManager": NODE_LOST,
    "DeletionByPodGC": NODE_LOST,
    "TerminationByKubelet": EVICTED,
}


@dataclass(frozen=True)
class JobObservation:
    """What a Job and its pods say, reduced to what the plan needs.

    ``state``: absent | active | succeeded | failed. ``termination``: the parsed JSON termination
    message (docs/contracts.md) of the most telling pod, or None. ``exit_code`` and ``reason``
    (Preempted, Evicted, NodeLost, OOMKilled, DataError, StorageError, DeadlineExceeded, Error,
    ...) explain a failure; ``waiting_reason``/``waiting_message``/``waiting_since`` explain an
    active Job whose pod does not run (Unschedulable, ImagePullBackOff, ...). ``attempt`` is the
    training attempt the Job was created for; ``deleting`` is true while it is being deleted;
    ``queued`` while it is suspended (Kueue has not admitted it yet).
    """

    state: str = ABSENT
    name: str | None = None
    uid: str | None = None
    attempt: int | None = None
    deleting: bool = False
    queued: bool = False
    termination: dict[str, Any] | None = None
    exit_code: int | None = None
    reason: str | None = None
    message: str | None = None
    waiting_reason: str | None = None
    waiting_message: str | None = None
    waiting_since: str | None = None

    @property
    def retryable(self) -> bool:
        """Whether another attempt can help (false for data/config errors: exit 2)."""
        if self.termination and self.termination.get("outcome") in NON_RETRYABLE_OUTCOMES:
            return False
        return self.exit_code != EXIT_INPUT and self.reason != DATA_ERROR


ABSENT_JOB = JobObservation()


def _true(conds: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    for cond in conds or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def _owned_by(pod: dict[str, Any], uid: str | None) -> bool:
    # Pods of an earlier Job with the same name may linger (background deletion): only the pods
    # of this Job object count.
    if not uid:
        return True
    meta = pod.get("metadata") or {}
    if any(ref.get("uid") == uid for ref in meta.get("ownerReferences") or []):
        return True
    labels = meta.get("labels") or {}
    return uid in (labels.get("controller-uid"), labels.get("batch.kubernetes.io/controller-uid"))


def parse_termination(text: str | None) -> dict[str, Any] | None:
    """The trainer's JSON termination message, or None when there is none or it is not JSON."""
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get(
            "terminated"
        )
        if term:
            return term
    return None


def _pod_index(pod: dict[str, Any]) -> int:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(ann.get("batch.kubernetes.io/job-completion-index", 0))
    except ValueError:
        return 0


def _pod_reason(pod: dict[str, Any], term: dict[str, Any] | None) -> str | None:
    status = pod.get("status") or {}
    disruption = _true(status.get("conditions"), "DisruptionTarget")
    if disruption:
        return DISRUPTION_REASONS.get(disruption.get("reason") or "", PREEMPTED)
    if status.get("reason") == "Evicted":
        return EVICTED
    if status.get("reason") in ("NodeLost", "Terminated", "NodeShutdown"):
        return NODE_LOST
    if term:
        if term.get("reason") == "OOMKilled":
            return OOM_KILLED
        code = term.get("exitCode")
        if code == EXIT_PREEMPTED:
            return PREEMPTED
        if code == EXIT_INPUT:
            return DATA_ERROR
        if code == EXIT_STORAGE:
            return STORAGE_ERROR
        if code not in (None, 0):
            return ERROR
    return None


def observe_job(job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> JobObservation:
    """Reduce a Job (None: absent) and its pods to a :class:`JobObservation`."""
    if job is None:
        return ABSENT_JOB
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    status = job.get("status") or {}
    uid = meta.get("uid")
    attempt_text = (meta.get("annotations") or {}).get(builders.ANNOTATION_ATTEMPT) or (
        meta.get("labels") or {}
    ).get(builders.LABEL_ATTEMPT)
    try:
        attempt = int(attempt_text) if attempt_text is not None else None
    except ValueError:
        attempt = None
    mine = [p for p in pods if _owned_by(p, uid)]
    conds = status.get("conditions")
    completions = spec.get("completions") or 1
    if (
        _true(conds, "Complete")
        or (status.get("succeeded") or 0) >= completions
        and not _true(conds, "Failed")
    ):
        state = SUCCEEDED
    elif _true(conds, "Failed") or _true(conds, "FailureTarget"):
        state = FAILED
    else:
        state = ACTIVE

    # The most telling pod: for a failure the failed pod with a termination message (rank 0
    # first, it speaks for the gang), for a success index 0; among equals the newest.
    wanted = {SUCCEEDED: "Succeeded", FAILED: "Failed"}.get(state)

    def rank(pod: dict[str, Any]) -> tuple[int, int, int]:
        term = _terminated(pod)
        return (
            0 if (pod.get("status") or {}).get("phase") == wanted else 1,
            0 if term and parse_termination(term.get("message")) else 1,
            _pod_index(pod),
        )

    newest_first = sorted(
        mine,
        key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or ""),
        reverse=True,
    )
    termination = exit_code = reason = message = None
    waiting_reason = waiting_message = waiting_since = None
    if mine:
        pod = sorted(newest_first, key=rank)[0]
        term = _terminated(pod)
        if term:
            termination = parse_termination(term.get("message"))
            exit_code = term.get("exitCode")
            if termination is None and term.get("message"):
                # FallbackToLogsOnError: the last log lines, not our JSON.
                message = str(term["message"])[-1000:]
        reason = _pod_reason(pod, term)
        if termination:
            reason = OUTCOME_REASONS.get(str(termination.get("outcome")), reason)
            message = termination.get("message") or message
        if state == ACTIVE:
            for p in mine:
                w = _waiting(p)
                if w:
                    waiting_reason, waiting_message = w
                    waiting_since = (p.get("metadata") or {}).get("creationTimestamp")
                    break
    if state == FAILED and reason is None:
        failed = _true(conds, "Failed") or _true(conds, "FailureTarget") or {}
        reason = DEADLINE_EXCEEDED if failed.get("reason") == "DeadlineExceeded" else ERROR
        message = message or failed.get("message")
    return JobObservation(
        state=state,
        name=meta.get("name"),
        uid=uid,
        attempt=attempt,
        deleting=bool(meta.get("deletionTimestamp")),
        queued=bool(spec.get("suspend")) and state == ACTIVE,
        termination=termination,
        exit_code=exit_code,
        reason=reason,
        message=message,
        waiting_reason=waiting_reason,
        waiting_message=waiting_message,
        waiting_since=waiting_since,
    )


def _waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("reason") or "Unschedulable", cond.get("message") or ""
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
            return waiting["reason"], waiting.get("message") or ""
    return None


# --- actions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateJob:
    """Create this Job (idempotently: an existing one of that name is left alone)."""

    manifest: dict[str, Any]


@dataclass(frozen=True)
class DeleteJob:
    """Delete the Job ``name`` (its pods go with it; the trainer checkpoints on SIGTERM)."""

    name: str
    reason: str


@dataclass(frozen=True)
class DeleteFineTuneJob:
    """Delete the FineTuneJob itself (``ttlSecondsAfterFinished`` elapsed); artifacts stay."""

    reason: str


Action = CreateJob | DeleteJob | Event | Requeue | DeleteFineTuneJob


@dataclass
class Plan:
    """The complete new ``status`` and what to do."""

    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)

    def of(self, kind: type) -> list[Any]:
        """The actions of one class (convenience for callers and tests)."""
        return [a for a in self.actions if isinstance(a, kind)]


# --- the plan --------------------------------------------------------------------------------------

TERMINAL = ("Succeeded", "Failed")
STALE_JOB_REQUEUE = 1.0
WAITING_REQUEUE = 30.0


def _parse_ts(text: str | None) -> datetime.datetime | None:
    # A time a person edited into nonsense is "unknown" here, not a reconcile that always fails.
    try:
        return parse_time(text)
    except ValueError:
        return None


class _Builder:
    """Accumulates the new status and actions of one plan (one object, one pass)."""

    def __init__(
        self,
        ftj: dict[str, Any],
        now: datetime.datetime,
        image: str | None,
        report: str,
        defaults: PodDefaults | None = None,
    ) -> None:
        self.ftj = ftj
        self.now = now
        self.stamp = format_time(now)
        self.image = image
        self.report = report
        self.defaults = defaults
        self.spec = builders.parse_spec(ftj)
        # Merging spec.podTemplate into the pods can still refuse an override the schema could
        # not judge alone: find out now (InvalidSpec) rather than while creating a Job.
        builders.check_pod_template(ftj, defaults)
        self.old: dict[str, Any] = dict(ftj.get("status") or {})
        # Start from the old status: the trainer-owned fields (progress, metrics, checkpoints,
        # resumedFromStep) pass through untouched, so the diff never fights the trainer.
        self.status: dict[str, Any] = json.loads(json.dumps(self.old))
        self.status.setdefault("restarts", 0)
        self.status.setdefault("conditions", [])
        self.generation = (ftj.get("metadata") or {}).get("generation")
        if self.generation is not None:
            self.status["observedGeneration"] = self.generation
        self.actions: list[Action] = []

    # -- small helpers --

    def cond(self, type_: str, status: bool | str, reason: str, message: str) -> None:
        self.status["conditions"] = c.set_condition(
            self.status["conditions"], type_, status, reason, message, self.stamp, self.generation
        )

    def phase(self, phase: str, reason: str, message: str, *, warning: bool = False) -> None:
        """Set phase + message; an Event whenever the phase changes (DESIGN.md, status)."""
        if self.old.get("phase") != phase:
            self.actions.append(Event("Warning" if warning else "Normal", reason, message))
        self.status["phase"] = phase
        self.status["message"] = message

    def lifecycle(
        self,
        *,
        training: tuple[bool | str, str, str],
        succeeded: bool = False,
        failed: tuple[str, str] | None = None,
        suspended: bool = False,
    ) -> None:
        """Set the Training/Succeeded/Failed/Suspended conditions consistently."""
        self.cond(c.TRAINING, *training)
        if succeeded:
            self.cond(
                c.SUCCEEDED, True, Reason.TRAINING_SUCCEEDED, self.status.get("message") or ""
            )
        elif failed:
            self.cond(c.SUCCEEDED, False, failed[0], "failed")
        else:
            # Not (yet) succeeded: say where the job is, so `kubectl describe` reads naturally.
            waiting = {
                "Validating": Reason.VALIDATING,
                "Running": Reason.TRAINING_RUNNING,
                "Suspended": Reason.SUSPENDED,
            }.get(self.status.get("phase") or "", Reason.NOT_STARTED)
            self.cond(c.SUCCEEDED, False, waiting, "not finished")
        if failed:
            self.cond(c.FAILED, True, failed[0], failed[1])
        else:
            self.cond(c.FAILED, False, Reason.NOT_STARTED, "no failure")
        if suspended:
            self.cond(
                c.SUSPENDED,
                True,
                Reason.SUSPENDED,
                "spec.suspend is true: pods stopped, checkpoints kept",
            )
        elif c.get_condition(self.status["conditions"], c.SUSPENDED) is not None:
            self.cond(c.SUSPENDED, False, Reason.RESUMED_FROM_SUSPEND, "spec.suspend is false")

    def create(self, manifest: dict[str, Any]) -> None:
        self.actions.append(CreateJob(manifest))

    def requeue(self, seconds: float) -> None:
        self.actions.append(Requeue(max(float(seconds), 0.0)))

    def fail(self, reason: str, message: str, *, validated: bool | None = None) -> None:
        """Final failure: phase Failed, Failed=True with the reason and message, completionTime."""
        self.phase("Failed", reason, message, warning=True)
        if validated is False:
            self.cond(c.DATA_VALIDATED, False, reason, message)
        self.lifecycle(training=(False, reason, message), failed=(reason, message))
        self.status.setdefault("completionTime", self.stamp)

    def result(self) -> Plan:
        return Plan(self.status, self.actions)


def _data_summary(report: dict[str, Any] | None) -> str:
    if not report:
        return "data valid"
    parts = []
    for key, label in (
        ("valid", "valid"),
        ("invalid", "invalid"),
        ("duplicates", "duplicates removed"),
        ("trainExamples", "train"),
        ("validationExamples", "eval"),
    ):
        if report.get(key) is not None:
            parts.append(f"{report[key]} {label}")
    fmt = f" ({report['format']})" if report.get("format") else ""
    return ("data valid" + fmt + ": " + ", ".join(parts)) if parts else "data valid" + fmt


def _failure_text(obs: JobObservation) -> str:
    reason = obs.reason or ERROR
    detail = obs.message or (obs.termination or {}).get("message")
    if not detail:
        detail = f"exit code {obs.exit_code}" if obs.exit_code is not None else "no details"
    return f"{reason}: {detail}"


def _data_report(termination: dict[str, Any] | None) -> dict[str, Any] | None:
    report = (termination or {}).get("dataReport")
    if not isinstance(report, dict):
        return None
    from kubetune.api.finetunejob import DataReportSummary

    # Keep only the summary's fields (the full report is at reportUri): the status schema is
    # structural, unknown fields would be pruned by a real API server anyway.
    known = {f.alias or n for n, f in DataReportSummary.model_fields.items()}
    return {k: v for k, v in report.items() if k in known}


def _memory_estimate(termination: dict[str, Any] | None) -> dict[str, Any] | None:
    estimate = (termination or {}).get("memoryEstimate")
    if not isinstance(estimate, dict):
        return None
    from kubetune.api.finetunejob import MemoryEstimate

    known = {f.alias or n for n, f in MemoryEstimate.model_fields.items()}
    return {k: v for k, v in estimate.items() if k in known} or None


def plan(
    ftj: dict[str, Any],
    validate: JobObservation,
    train: JobObservation,
    now: datetime.datetime,
    *,
    image: str | None = None,
    report: str = "k8s",
    defaults: PodDefaults | None = None,
) -> Plan:
    """Decide the FineTuneJob's new status and the actions that move it towards its spec.

    ``ftj`` is the whole object (metadata, spec, status). ``validate``/``train`` are the
    observations of ``<ftj>-validate``/``<ftj>-train``. ``now`` is an aware datetime. ``image``
    and ``report`` are passed to the Job builders (the local runtime reports to a file), and so
    are the cluster's pod ``defaults`` (kubetune.api.defaults).
    """
    if (ftj.get("metadata") or {}).get("deletionTimestamp"):
        # Being deleted: children go with it (ownerReferences); nothing to decide.
        return Plan(dict(ftj.get("status") or {}), [])
    try:
        b = _Builder(ftj, now, image, report, defaults)
    except (ValidationError, PodTemplateError) as exc:
        return _invalid_spec(ftj, exc, now)
    st = b.status
    phase = b.old.get("phase")
    st.setdefault("startTime", b.stamp)

    # 1. Final phases stay final; only the TTL clock still runs.
    if phase in TERMINAL:
        for obs in (validate, train):
            if obs.state == ACTIVE and not obs.deleting:
                # e.g. failed on an image-pull deadline while the Job was left behind.
                b.actions.append(DeleteJob(obs.name or "", f"FineTuneJob is {phase}"))
        _ttl(b)
        return b.result()

    # 2. Data validation, until it has succeeded once (the result lives in status.dataReport).
    if not c.is_true(st["conditions"], c.DATA_VALIDATED):
        if validate.state in (SUCCEEDED, FAILED) and _memory_estimate(validate.termination):
            st["memoryEstimate"] = _memory_estimate(validate.termination)
        if validate.state == SUCCEEDED:
            st["dataReport"] = _data_report(validate.termination)
            if st["dataReport"] is None:
                st.pop("dataReport")
            summary = _data_summary(st.get("dataReport"))
            b.cond(c.DATA_VALIDATED, True, Reason.VALIDATION_SUCCEEDED, summary)
            b.actions.append(Event("Normal", Reason.VALIDATION_SUCCEEDED, summary))
            # fall through to training in this same pass
        elif validate.state == FAILED:
            reason = (
                Reason.VALIDATION_FAILED
                if not validate.retryable
                else (validate.reason or Reason.VALIDATION_FAILED)
            )
            report_doc = _data_report(validate.termination)
            if report_doc:
                st["dataReport"] = report_doc
            # The validation step also runs the memory pre-flight; its verdict names itself.
            what = (
                "memory pre-flight failed: "
                if (st.get("memoryEstimate") or {}).get("fits") is False
                else "data validation failed: "
            )
            b.fail(reason, what + (validate.message or _failure_text(validate)), validated=False)
            return b.result()
        elif b.spec.suspend:
            return _suspend(b, validate, train)
        else:
            if validate.state == ABSENT:
                b.create(
                    builders.build_validate_job(ftj, image=image, report=report, defaults=defaults)
                )
            message = "validating the dataset"
            if validate.waiting_reason:
                message += f" (pod waiting: {validate.waiting_reason}: {validate.waiting_message})"
                if _image_pull_expired(validate, now):
                    b.fail(
                        Reason.IMAGE_PULL,
                        f"cannot pull the trainer image: {validate.waiting_message}",
                    )
                    b.actions.append(DeleteJob(validate.name or "", "image pull failed"))
                    return b.result()
            b.phase("Validating", Reason.VALIDATING, message)
            b.cond(c.DATA_VALIDATED, "Unknown", Reason.VALIDATING, message)
            b.lifecycle(training=(False, Reason.NOT_STARTED, "waiting for data validation"))
            if validate.waiting_reason in IMAGE_PULL_REASONS:
                b.requeue(WAITING_REQUEUE)
            return b.result()

    # 3. Training.
    return _train(b, train)


def _invalid_spec(
    ftj: dict[str, Any], exc: ValidationError | PodTemplateError, now: datetime.datetime
) -> Plan:
    # The job fails for good (a spec fix is a new generation, which the plan reads afresh); the
    # restart count stays what it was. A PodTemplateError is an override the merge refused
    # against the built pods (its message names spec.podTemplate.<field> already).
    status, events = c.invalid_spec_status(
        ftj, c.invalid_spec_message(exc), format_time(now), "Failed", [(c.FAILED, True)]
    )
    status["restarts"] = status.get("restarts") or 0
    actions: list[Action] = [*events]
    return Plan(status, actions)


def _ttl(b: _Builder) -> None:
    ttl = b.spec.ttl_seconds_after_finished
    if ttl is None:
        return
    done = _parse_ts(b.status.get("completionTime")) or b.now
    left = (done + datetime.timedelta(seconds=ttl) - b.now).total_seconds()
    if left <= 0:
        b.actions.append(DeleteFineTuneJob(f"ttlSecondsAfterFinished={ttl} elapsed"))
    else:
        b.requeue(left)


def _image_pull_expired(obs: JobObservation, now: datetime.datetime) -> bool:
    if obs.waiting_reason not in IMAGE_PULL_REASONS:
        return False
    since = _parse_ts(obs.waiting_since)
    return since is not None and (now - since).total_seconds() >= IMAGE_PULL_DEADLINE


def _suspend(b: _Builder, validate: JobObservation, train: JobObservation) -> Plan:
    for obs in (validate, train):
        if obs.state == ACTIVE and not obs.deleting:
            b.actions.append(DeleteJob(obs.name or "", "FineTuneJob suspended"))
    message = "suspended: pods stopped, checkpoints kept; set spec.suspend=false to resume"
    b.phase("Suspended", Reason.SUSPENDED, message)
    b.lifecycle(training=(False, Reason.SUSPENDED, message), suspended=True)
    if not c.is_true(b.status["conditions"], c.DATA_VALIDATED):
        b.cond(c.DATA_VALIDATED, "Unknown", Reason.SUSPENDED, "validation suspended")
    return b.result()


def _train(b: _Builder, train: JobObservation) -> Plan:
    st = b.status
    spec = b.spec
    restarts = int(st.get("restarts") or 0)
    max_restarts = spec.retry.max_restarts

    # A Job left over from an earlier attempt: its outcome was already counted.
    if train.state != ABSENT and (train.attempt or 0) < restarts:
        if not train.deleting:
            b.actions.append(DeleteJob(train.name or "", f"stale attempt {train.attempt or 0}"))
        b.requeue(STALE_JOB_REQUEUE)
        _running_status(
            b,
            "replacing the Job of an earlier attempt",
            (False, Reason.RESTARTING, "replacing the Job of an earlier attempt"),
        )
        return b.result()

    if train.state == SUCCEEDED:
        return _succeeded(b, train)

    if spec.suspend:
        # Before failure handling: a pod killed because we suspended is not a failed attempt.
        return _suspend(b, ABSENT_JOB, train)

    if train.state == FAILED:
        text = _failure_text(train)
        st["lastFailureReason"] = train.reason or ERROR
        st["lastFailureTime"] = b.stamp
        if not train.retryable:
            b.fail(train.reason or Reason.DATA_ERROR, f"training failed (not retried): {text}")
            return b.result()
        if restarts >= max_restarts:
            b.fail(
                Reason.RESTARTS_EXHAUSTED,
                f"training failed after {restarts} restart(s) (retry.maxRestarts={max_restarts}); last: {text}",
            )
            return b.result()
        # Count the restart in the status before the Job goes (callers write status first), so
        # a crash in between never counts it twice nor loses it.
        st["restarts"] = restarts + 1
        b.actions.append(DeleteJob(train.name or "", f"attempt {restarts} failed: {train.reason}"))
        b.actions.append(
            Event(
                "Warning",
                Reason.RESTARTING,
                f"attempt {restarts} failed ({text}); restart {restarts + 1}/{max_restarts} in {spec.retry.backoff_seconds}s",
            )
        )
        message = f"restart {restarts + 1}/{max_restarts} in {spec.retry.backoff_seconds}s after {train.reason}"
        _running_status(b, message, (False, Reason.RESTARTING, message))
        b.requeue(spec.retry.backoff_seconds)
        return b.result()

    if train.state == ABSENT:
        if restarts > 0:
            failed_at = _parse_ts(st.get("lastFailureTime"))
            wait = 0.0
            if failed_at is not None:
                wait = (
                    failed_at + datetime.timedelta(seconds=spec.retry.backoff_seconds) - b.now
                ).total_seconds()
            if wait > 0:
                message = f"restart {restarts}/{max_restarts} in {int(wait + 0.999)}s after {st.get('lastFailureReason')}"
                _running_status(b, message, (False, Reason.RESTARTING, message))
                b.requeue(wait)
                return b.result()
        b.create(
            builders.build_train_job(
                b.ftj, attempt=restarts, image=b.image, report=b.report, defaults=b.defaults
            )
        )
        if restarts > 0:
            message = f"training attempt {restarts} started, resuming from the last checkpoint"
            reason = Reason.RESUMED
        elif b.old.get("phase") == "Suspended":
            message, reason = "training resumed after suspension", Reason.RESUMED_FROM_SUSPEND
        else:
            message, reason = "training started", Reason.TRAINING_STARTED
        if b.old.get("phase") == "Running":
            # Same phase, a new attempt: still worth an Event.
            b.actions.append(Event("Normal", reason, message))
        _running_status(b, message, (True, reason, message), reason=reason)
        return b.result()

    # Active.
    if train.queued:
        message = (
            f"queued: waiting for Kueue admission in queue {spec.queue_name}"
            if spec.queue_name
            else "Job suspended, waiting for admission"
        )
        _running_status(b, message, (False, Reason.PENDING, message))
        return b.result()
    if train.waiting_reason:
        if _image_pull_expired(train, b.now):
            b.actions.append(DeleteJob(train.name or "", "image pull failed"))
            b.fail(Reason.IMAGE_PULL, f"cannot pull the trainer image: {train.waiting_message}")
            return b.result()
        reason = train.waiting_reason
        if reason == "Unschedulable":
            reason = (
                Reason.INSUFFICIENT_GPUS
                if builders.GPU_RESOURCE in (train.waiting_message or "")
                else Reason.UNSCHEDULABLE
            )
        elif reason in IMAGE_PULL_REASONS:
            reason = Reason.IMAGE_PULL
        message = f"trainer pod pending: {train.waiting_message or train.waiting_reason}"
        _running_status(b, message, (False, reason, message))
        if train.waiting_reason in IMAGE_PULL_REASONS:
            b.requeue(WAITING_REQUEUE)
        return b.result()
    message = _running_message(st, restarts)
    _running_status(b, message, (True, Reason.TRAINING_RUNNING, message))
    return b.result()


def _running_message(st: dict[str, Any], restarts: int) -> str:
    progress = st.get("progress") or {}
    parts = ["training"]
    if progress.get("step") is not None and progress.get("totalSteps"):
        parts.append(f"step {progress['step']}/{progress['totalSteps']}")
    if restarts:
        parts.append(f"attempt {restarts}")
    if st.get("resumedFromStep") is not None:
        parts.append(f"resumed from step {st['resumedFromStep']}")
    return ", ".join(parts)


def _running_status(
    b: _Builder,
    message: str,
    training: tuple[bool | str, str, str],
    reason: str = Reason.TRAINING_STARTED,
) -> None:
    b.phase("Running", reason, message)
    b.lifecycle(training=training)


def _succeeded(b: _Builder, train: JobObservation) -> Plan:
    st = b.status
    term = train.termination or {}
    artifact = term.get("artifact") if isinstance(term.get("artifact"), dict) else None
    if not artifact or not artifact.get("uri"):
        # No (or a truncated) termination message: the artifact's place is fixed by the output
        # layout (docs/contracts.md); only the digest is unknown.
        artifact = {"uri": b.spec.output.uri.rstrip("/") + "/model/"}
    st["artifact"] = {
        k: v
        for k, v in artifact.items()
        if k in ("uri", "digest", "lineageUri", "mergedUri") and v is not None
    }
    metrics = term.get("metrics")
    if isinstance(metrics, dict):
        merged = dict(st.get("metrics") or {})
        for key in ("trainLoss", "evalLoss", "bestEvalLoss", "evalPerplexity", "evalAccuracy"):
            if metrics.get(key) is not None:
                merged[key] = metrics[key]
        if merged:
            st["metrics"] = merged
    progress = dict(st.get("progress") or {})
    if isinstance(term.get("step"), int):
        progress["step"] = term["step"]
    progress["percent"] = 100
    progress["etaSeconds"] = 0
    st["progress"] = progress
    st["completionTime"] = b.stamp
    message = f"training succeeded: artifact {st['artifact']['uri']}"
    b.phase("Succeeded", Reason.TRAINING_SUCCEEDED, message)
    b.lifecycle(training=(False, Reason.TRAINING_SUCCEEDED, message), succeeded=True)
    _ttl(b)
    return b.result()
