"""Actions both decision functions return (``finetune.reconcile.plan`` and ``rollout.machine.step``).

Kind-specific actions live beside their decision function; these two are shared so that the
operator and the local runtime execute them the same way for both kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

A = TypeVar("A")


@dataclass(frozen=True)
class Event:
    """Record a Kubernetes Event on the object (``type`` Normal or Warning)."""

    type: str
    reason: str
    message: str


@dataclass(frozen=True)
class Requeue:
    """Decide again after this many seconds even if nothing changes (backoff, TTL, deadlines)."""

    seconds: float


def events_first(actions: Sequence[A]) -> list[A]:
    """The order a runtime carries out a pass in, after writing its status: Events, then the rest.

    Record, then act (docs/contracts.md): the status write and the Events that say what was
    decided come before any action. Someone who sees an effect (a Deployment gone, a Job
    created) then finds the Event that explains it. A pass that dies half-way leaves its Events
    posted and its status written, and the next pass derives the actions again. The other
    actions keep their order (weights before scale-downs and deletes).
    """
    return [a for a in actions if isinstance(a, Event)] + [
        a for a in actions if not isinstance(a, Event)
    ]
