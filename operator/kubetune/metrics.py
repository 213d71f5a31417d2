"""The operator's own Prometheus metrics (served on ``/metrics`` of the operator pod).

These describe the *operator*, not the models: reconciles and errors by kind, FineTuneJobs and
ModelDeployments by phase, rollouts and rollbacks. The inference server's metrics
(``kubetune_server_*``) are a separate contract (docs/contracts.md).

Everything is registered in :data:`REGISTRY`, a registry of our own rather than
prometheus_client's global one: the operator, the local runtime and the test suite may run in
one process with the inference server, and two owners of one global registry would collide.

Who feeds what:

- the reconcilers wrap each reconcile in ``with metrics.reconcile(kind):`` (counts, errors by
  exception class, duration);
- everything else is derived from the objects' status by :mod:`kubetune.startup` (watch events
  -> :func:`observe_status`): the per-phase gauges, promotions, rollbacks and restarts. So the
  reconcilers must *not* call ``record_*`` themselves (that would count twice);
- ``metrics.serve(port)`` once at startup (the chart sets ``KUBETUNE_METRICS_PORT``;
  :func:`serve_from_env` reads it; :mod:`kubetune.startup` calls it).

Metric names are stable: dashboards and alerts use them, and
docs/operations.md lists them.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

KINDS = ("FineTuneJob", "ModelDeployment")
FTJ_PHASES = ("Pending", "Validating", "Running", "Succeeded", "Failed", "Suspended")
MDEP_PHASES = (
    "Pending",
    "Progressing",
    "Paused",
    "Healthy",
    "Degraded",
    "RolledBack",
    "ScaledToZero",
)
PHASES = {"FineTuneJob": FTJ_PHASES, "ModelDeployment": MDEP_PHASES}

RECONCILES = Counter(
    "kubetune_operator_reconciles_total",
    "Reconciles run, by kind and result (ok or error).",
    ["kind", "result"],
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "kubetune_operator_reconcile_errors_total",
    "Reconciles that raised, by kind and exception class (Kopf retries them with backoff).",
    ["kind", "error"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "kubetune_operator_reconcile_duration_seconds",
    "Wall time of one reconcile, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
FINETUNEJOBS = Gauge(
    "kubetune_finetunejobs",
    "FineTuneJobs known to this operator, by phase.",
    ["phase"],
    registry=REGISTRY,
)
MODELDEPLOYMENTS = Gauge(
    "kubetune_modeldeployments",
    "ModelDeployments known to this operator, by phase (Progressing = a canary rollout is running).",
    ["phase"],
    registry=REGISTRY,
)
ROLLOUTS = Counter(
    "kubetune_rollouts_total",
    "Canary rollouts that ended, by result (Promoted, RolledBack, Aborted, Superseded).",
    ["result"],
    registry=REGISTRY,
)
ROLLBACKS = Counter(
    "kubetune_rollbacks_total",
    "Automatic or manual rollbacks, by reason (AnalysisFailed, EvalGateFailed, ProgressDeadlineExceeded, Aborted, ...).",
    ["reason"],
    registry=REGISTRY,
)
TRAINING_RESTARTS = Counter(
    "kubetune_finetunejob_restarts_total",
    "Training attempts restarted from a checkpoint, by reason (Preempted, OOMKilled, Evicted, ...).",
    ["reason"],
    registry=REGISTRY,
)

_GAUGES = {"FineTuneJob": FINETUNEJOBS, "ModelDeployment": MODELDEPLOYMENTS}

# The phase of every object we have seen, so the per-phase gauges are exact counts that a
# reconcile can update with one call, however many times it runs (level-triggered).
_phases: dict[tuple[str, str, str], str] = {}
_lock = threading.Lock()

for _kind, _phases_of_kind in PHASES.items():
    for _phase in _phases_of_kind:
        _GAUGES[_kind].labels(phase=_phase).set(0)  # every phase is exported, even at 0


def _recount(kind: str) -> None:
    counts = dict.fromkeys(PHASES[kind], 0)
    for (k, _ns, _name), phase in _phases.items():
        if k == kind:
            counts[phase] = counts.get(phase, 0) + 1
    for phase, count in counts.items():
        _GAUGES[kind].labels(phase=phase).set(count)


def set_phase(kind: str, namespace: str, name: str, phase: str | None) -> None:
    """Record the current phase of one object (None: not known yet, counted nowhere)."""
    with _lock:
        key = (kind, namespace, name)
        if phase is None:
            _phases.pop(key, None)
        else:
            _phases[key] = phase
        _recount(kind)


def forget(kind: str, namespace: str, name: str) -> None:
    """The object was deleted: it no longer counts in any phase."""
    set_phase(kind, namespace, name, None)


@contextlib.contextmanager
def reconcile(kind: str) -> Iterator[None]:
    """Count one reconcile of ``kind`` and time it; an exception counts as an error and propagates."""
    start = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        RECONCILES.labels(kind=kind, result="error").inc()
        RECONCILE_ERRORS.labels(kind=kind, error=type(exc).__name__).inc()
        raise
    else:
        RECONCILES.labels(kind=kind, result="ok").inc()
    finally:
        RECONCILE_DURATION.labels(kind=kind).observe(time.perf_counter() - start)


def record_rollout(result: str) -> None:
    """A canary rollout ended (Promoted, RolledBack, Aborted, Superseded)."""
    ROLLOUTS.labels(result=result).inc()


def record_rollback(reason: str) -> None:
    """A canary was rolled back; also counts the rollout as RolledBack."""
    ROLLBACKS.labels(reason=reason).inc()
    ROLLOUTS.labels(result="RolledBack").inc()


def record_restart(reason: str) -> None:
    """A training attempt was restarted."""
    TRAINING_RESTARTS.labels(reason=reason).inc()


# Last status seen per object, to turn status changes into rollout/rollback/restart counts.
_last: dict[tuple[str, str, str], dict[str, object]] = {}


def _degraded_reason(status: dict) -> str:
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Degraded" and cond.get("status") == "True" and cond.get("reason"):
            return str(cond["reason"])
    return "Unknown"


def observe_status(kind: str, namespace: str, name: str, status: dict | None) -> None:
    """Update every metric that follows from an object's status (called on each watch event).

    Level-triggered like the reconcilers: the per-phase gauges are set from ``status.phase``;
    counters move only on a *change* against the last status seen for that object, so replays
    of the same status (relists, resyncs) count nothing twice. After an operator restart the
    first status seen is a baseline, not a transition.
    """
    status = status or {}
    set_phase(kind, namespace, name, status.get("phase"))
    key = (kind, namespace, name)
    with _lock:
        before = _last.get(key)
        _last[key] = {
            "phase": status.get("phase"),
            "restarts": int(status.get("restarts") or 0),
            "stable": (status.get("stable") or {}).get("name"),
            "rejected": len(status.get("rejectedRevisions") or []),
        }
        now = _last[key]
    if before is None:
        return
    if kind == "FineTuneJob" and now["restarts"] > before["restarts"]:  # type: ignore[operator]
        record_restart(str(status.get("lastFailureReason") or "Unknown"))
    if kind == "ModelDeployment":
        if now["rejected"] > before["rejected"]:  # type: ignore[operator]
            record_rollback(_degraded_reason(status))
        elif before["stable"] and now["stable"] != before["stable"]:
            record_rollout("Promoted")


def forget_status(kind: str, namespace: str, name: str) -> None:
    """The object was deleted: drop it from the gauges and the transition memory."""
    forget(kind, namespace, name)
    with _lock:
        _last.pop((kind, namespace, name), None)


_server_port: int | None = None


def serve(port: int, addr: str = "0.0.0.0") -> int:
    """Serve :data:`REGISTRY` on ``http://addr:port/metrics`` (once per process); the port bound."""
    global _server_port
    with _lock:
        if _server_port is None:
            server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
            _server_port = server.server_address[1]
        return _server_port


def serve_from_env() -> int | None:
    """Serve metrics on ``$KUBETUNE_METRICS_PORT`` when set (the chart sets it); else nothing."""
    raw = os.environ.get("KUBETUNE_METRICS_PORT", "").strip()
    if not raw:
        return None
    return serve(int(raw), os.environ.get("KUBETUNE_METRICS_ADDR", "0.0.0.0"))
