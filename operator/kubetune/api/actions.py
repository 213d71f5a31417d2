"""Actions both decision functions return (``finetune.reconcile.plan`` and ``rollout.machine.step``).

Kind-specific actions live beside their decision function; these two are shared so that the
operator and the local runtime execute them the same way for both kinds.
"""

from __future__ import annotations

from dataclasses import dataclass


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
