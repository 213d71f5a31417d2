"""What a runtime observed for one rollout step: the machine's input besides the object.

The operator (``k8s/deployments.observe``) and the local runtime fill these in; the machine
(``rollout.machine.step``) only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kubetune.rollout import analysis as an
from kubetune.rollout import evalgate
from kubetune.rollout import weights as wt
from kubetune.rollout.revisions import ModelProblem, Revision


@dataclass(frozen=True)
class RevisionObservation:
    """What a runtime sees of one revision's pods right now."""

    # Pods the revision has now (not yet terminated; a Deployment's status.replicas).
    replicas: int = 0
    ready_replicas: int = 0
    available: bool = False
    # Set when the pods will not become ready by waiting: CrashLoopBackOff, ImagePullBackOff,
    # the Deployment's ProgressDeadlineExceeded. ``failure_reason`` is a Reason constant.
    failure: str | None = None
    failure_reason: str | None = None
    # Cumulative counters summed over the revision's pods: scraped from them (built-in provider)
    # or read from Prometheus (its default queries). None: not read, ``scrape_error`` says why.
    counters: an.RevisionCounters | None = None
    scrape_error: str | None = None


@dataclass(frozen=True)
class Observed:
    """Everything a runtime observed for one step (see the module docstring)."""

    model: Revision | ModelProblem
    revisions: Mapping[str, RevisionObservation] = field(default_factory=dict)
    # Resolved traffic mode: weights.GATEWAY_API, weights.REPLICAS or weights.LOCAL.
    mode: str = wt.REPLICAS
    # Prometheus provider with custom query templates: each revision's figures over the interval
    # ending now (analysis.uses_counters is False).
    interval_metrics: Mapping[str, an.IntervalMetrics] | None = None
    # None: read kubetune.io/promote|abort|pause from md.metadata.annotations.
    annotations: Mapping[str, str] | None = None
    # The pre-traffic eval gate's result, when ``eval_gate_due(md)`` asked the runtime to run it.
    eval_gate: evalgate.EvalGateObservation | None = None
    # Why the traffic split cannot be applied (traffic.mode gatewayAPI without the Gateway API).
    traffic_problem: str | None = None

    @property
    def resolved_revision(self) -> str | None:
        """The hash of the revision the spec asks for, None while unresolvable."""
        return self.model.name if isinstance(self.model, Revision) else None
