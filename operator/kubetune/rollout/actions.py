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
