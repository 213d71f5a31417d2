"""What the rollout machine asks a runtime to do: its actions, and the ``Step`` that carries them.

Both runtimes execute them in the order given (k8s/deployments.py, local/deployments.py):
scale up and create, route, scale down, delete, tell. Weight changes always precede any
scale-down or deletion. ``Event`` and ``Requeue`` are shared with the FineTuneJob planner
(api/actions.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.actions import Event, Requeue
from kubetune.api.conditions import Reason
from kubetune.rollout.builders import ROLE_CANARY
from kubetune.rollout.revisions import Revision


@dataclass(frozen=True)
class EnsureRevision:
    """Make revision's Deployment exist with ``replicas`` pods (create from ``source`` when absent)."""

    revision: str
    replicas: int
    role: str = ROLE_CANARY
    source: Revision | None = None


@dataclass(frozen=True)
class SetWeights:
    """Route ``stable``/``canary`` percent; ``weights`` is the full revision -> weight map."""

    stable: int
    canary: int
    weights: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DeleteRevision:
    """Remove a revision's Deployment, Service and PDB (its weight is already 0)."""

    revision: str
    reason: str = ""


@dataclass(frozen=True)
class RemoveAnnotation:
    """A one-shot annotation (promote, abort) was acted on: remove it from the object."""

    key: str


Action = EnsureRevision | SetWeights | DeleteRevision | Event | Requeue | RemoveAnnotation


@dataclass(frozen=True)
class Step:
    """The complete new status and the actions, in execution order."""

    status: dict[str, Any]
    actions: list[Action]

    def of(self, kind: type) -> list[Any]:
        """Actions of one type (tests, executors)."""
        return [a for a in self.actions if isinstance(a, kind)]


def with_orphans_deleted(decided: Step, observed: Any) -> Step:
    """``decided`` plus a ``DeleteRevision`` for each observed revision its status does not name.

    Record, then act (docs/contracts.md) leaves one window: the step that deletes a retired
    revision also drops it from ``status.retiring``, and a runtime that dies between that status
    write and the delete leaves a Deployment nothing names. The next step finds it here.
    """
    status = decided.status
    named = {(status.get(role) or {}).get("name") for role in ("stable", "canary")}
    named |= {r.get("name") for r in status.get("retiring") or []}
    deleting = {a.revision for a in decided.actions if isinstance(a, DeleteRevision)}
    orphans = sorted(set(observed.revisions) - named - deleting)
    if not orphans:
        return decided
    extra = [DeleteRevision(rev, Reason.ORPHANED) for rev in orphans]
    return Step(decided.status, [*decided.actions, *extra])
