"""Condition types, reasons, the one function that sets a condition, and the invalid-spec status.

Every reason string the operator writes is a constant here (STYLE.md: one place, like Kubeflow
Trainer's ``...Reason`` constants), so that docs, tests and Argo CD health scripts agree.
``kubectl wait --for=condition=Succeeded ftj/NAME`` and ``--for=condition=Ready mdep/NAME``
rely on the types.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from kubetune.api.actions import Event

# --- FineTuneJob condition types ---
DATA_VALIDATED = "DataValidated"
TRAINING = "Training"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"

# --- ModelDeployment condition types ---
READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
MODEL_RESOLVED = "ModelResolved"

# --- reasons (CamelCase, stable: tools match on them) ---
class Reason:
    """Reasons for conditions and Events."""

    # FineTuneJob lifecycle
    CREATED = "Created"
    VALIDATING = "ValidatingData"
    VALIDATION_SUCCEEDED = "DataValid"
    VALIDATION_FAILED = "InvalidData"
    TRAINING_STARTED = "TrainingStarted"
    TRAINING_RUNNING = "TrainingRunning"
    TRAINING_SUCCEEDED = "TrainingSucceeded"
    TRAINING_FAILED = "TrainingFailed"
    RESTARTING = "Restarting"
    RESUMED = "ResumedFromCheckpoint"
    RESTARTS_EXHAUSTED = "RestartsExhausted"
    OOM_KILLED = "OOMKilled"
    IMAGE_PULL = "ImagePullFailed"
    UNSCHEDULABLE = "Unschedulable"
    INSUFFICIENT_GPUS = "InsufficientGPUs"
    STORAGE_ERROR = "StorageError"
    PREEMPTED = "Preempted"
    DATA_ERROR = "DataError"
    SUSPENDED = "Suspended"
    RESUMED_FROM_SUSPEND = "Resumed"
    NOT_STARTED = "NotStarted"
    PENDING = "Pending"

    # Both kinds: a spec the schema refuses (see ``invalid_spec_status``).
    INVALID_SPEC = "InvalidSpec"

    # ModelDeployment lifecycle
    WAITING_FOR_MODEL = "WaitingForFineTuneJob"
    MODEL_NOT_FOUND = "FineTuneJobNotFound"
    MODEL_FAILED = "FineTuneJobFailed"
    MODEL_RESOLVED = "ModelResolved"
    DEPLOYING = "Deploying"
    STABLE_READY = "StableReady"
    STABLE_NOT_READY = "StableNotReady"
    CANARY_PROGRESSING = "CanaryProgressing"
    CANARY_PAUSED = "CanaryPaused"
    EVAL_GATE_FAILED = "EvalGateFailed"
    ANALYSIS_FAILED = "AnalysisFailed"
    ANALYSIS_INCONCLUSIVE = "AnalysisInconclusive"
    CANARY_CRASHLOOP = "CanaryCrashLooping"
    # A server found an adapter whose manifest digest is not the revision's (lineage guarantee):
    # its pod stays unready, /readyz names the digest found.
    ADAPTER_DIGEST_MISMATCH = "AdapterDigestMismatch"
    DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
    ABORTED = "Aborted"
    PROMOTED = "Promoted"
    ROLLED_BACK = "RolledBack"
    # A canary replaced by a newer revision before it finished (also a retired revision's reason).
    SUPERSEDED = "Superseded"
    # The HTTPRoute cannot be written (no Gateway API, or the route refused): Degraded.
    TRAFFIC_UNAVAILABLE = "TrafficRoutingUnavailable"
    # A revision's Deployment that status names neither stable, canary nor retiring (a runtime
    # died between recording its retirement and deleting it): deleted.
    ORPHANED = "Orphaned"
    TOO_FEW_REPLICAS = "TooFewReplicasForWeight"
    SCALED_TO_ZERO = "ScaledToZero"
    # A new revision waits at spec.replicas 0: a canary needs stable pods to be compared with.
    ROLLOUT_NEEDS_REPLICAS = "RolloutNeedsReplicas"


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    now: str,
    observed_generation: int | None = None,
) -> list[dict[str, Any]]:
    """Return a new condition list with ``type_`` set (Kubernetes condition semantics).

    ``lastTransitionTime`` changes only when the status flips; reason and message are updated
    in place. The input list is not modified, so callers can compare old and new to decide
    whether a status write is needed at all.
    """
    value = status if isinstance(status, str) else ("True" if status else "False")
    out: list[dict[str, Any]] = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(dict(cond))
            continue
        found = True
        new = dict(cond)
        if cond.get("status") != value:
            new["lastTransitionTime"] = now
        new.update(status=value, reason=reason, message=message)
        if observed_generation is not None:
            new["observedGeneration"] = observed_generation
        out.append(new)
    if not found:
        new = {"type": type_, "status": value, "reason": reason, "message": message, "lastTransitionTime": now}
        if observed_generation is not None:
            new["observedGeneration"] = observed_generation
        out.append(new)
    return out


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    """The condition of that type, or None."""
    for cond in conditions or []:
        if cond.get("type") == type_:
            return cond
    return None


def is_true(conditions: list[dict[str, Any]] | None, type_: str) -> bool:
    """Whether the condition exists with status True."""
    cond = get_condition(conditions, type_)
    return bool(cond and cond.get("status") == "True")


# --- a spec the operator cannot act on ---------------------------------------------------------
#
# A real API server rejects such a spec through the CRD schema; this is the defence for servers
# without validation (kmock, an outdated CRD) and for the local runtime. Both kinds' decision
# functions report it the same way: the fields named like kubectl names them, reason
# InvalidSpec, one Warning Event when the message changes, nothing else touched.


def invalid_spec_message(exc: Exception) -> str:
    """``invalid spec: spec.<field path>: <problem>`` for the first few schema errors.

    Any other error (a pod-template override the merge refused) names its field itself: its
    text is used as it is.
    """
    if isinstance(exc, ValidationError):
        errors = "; ".join(
            "spec." + ".".join(str(p) for p in err["loc"]) + ": " + err["msg"]
            for err in exc.errors()[:5]
        )
    else:
        errors = str(exc)
    return f"invalid spec: {errors}"


def invalid_spec_status(
    obj: Mapping[str, Any],
    message: str,
    now: str,
    phase: str,
    conditions: Iterable[tuple[str, bool]],
) -> tuple[dict[str, Any], list[Event]]:
    """``obj``'s new status for an invalid spec, and the Warning Event to emit (if any).

    ``conditions`` lists the condition types to set with reason InvalidSpec and ``message``;
    everything else in the status (what serves, restarts, progress) is kept. The Event goes out
    only when phase or message change, so a requeued invalid object does not repeat it.
    """
    old = obj.get("status") or {}
    gen = (obj.get("metadata") or {}).get("generation")
    status = copy.deepcopy(dict(old))
    conds = status.get("conditions") or []
    for type_, value in conditions:
        conds = set_condition(conds, type_, value, Reason.INVALID_SPEC, message, now, gen)
    status.update(phase=phase, message=message, conditions=conds)
    if gen is not None:
        status["observedGeneration"] = gen
    events: list[Event] = []
    if old.get("phase") != phase or old.get("message") != message:
        events.append(Event("Warning", Reason.INVALID_SPEC, message))
    return status, events
