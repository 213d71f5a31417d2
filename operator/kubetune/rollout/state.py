"""The rollout machine's working state: ``ModelDeployment.status``, typed, read and written once.

``RolloutState.from_status`` takes the status the previous step wrote (everything the machine
remembers lives there, so an operator restart simply continues); the recipe works on the typed
fields; ``to_status`` turns it back into the status dict once, at the end of the step. Keys the
machine does not own are carried through untouched (``other``). Unset fields (None, empty
lists) are left out of the status, as the previous step's were.

The nested records keep the API's shape (``api.modeldeployment.RevisionStatus``,
``AnalysisResult``, ``AnalysisBaseline``, ``RetiringRevision``, ``RejectedRevision``): they are
written to status as they are and validated against those models by the scenario tests.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

Record = dict[str, Any]

# Field name -> status key (the API's camelCase).
_KEYS = {
    "phase": "phase",
    "message": "message",
    "observed_generation": "observedGeneration",
    "conditions": "conditions",
    "replicas": "replicas",
    "selector": "selector",
    "stable": "stable",
    "canary": "canary",
    "current_step_index": "currentStepIndex",
    "step_started_at": "stepStartedAt",
    "canary_started_at": "canaryStartedAt",
    "weights": "weights",
    "analysis": "analysis",
    "eval_gate_score": "evalGateScore",
    "eval_gate_stable_score": "evalGateStableScore",
    "analysis_baseline": "analysisBaseline",
    "retiring": "retiring",
    "rejected_revisions": "rejectedRevisions",
    "paused": "paused",
}


@dataclass
class RolloutState:
    """Everything a ModelDeployment's rollout remembers between steps (see the module docstring)."""

    phase: str | None = None
    message: str | None = None
    observed_generation: int | None = None
    conditions: list[Record] = field(default_factory=list)
    # The scale subresource's status half: stable's pods now, the selector of every serving pod.
    replicas: int | None = None
    selector: str | None = None
    # The serving revisions (RevisionStatus records); canary None: no rollout under way.
    stable: Record | None = None
    canary: Record | None = None
    # Where the canary is in spec.rollout.steps, and since when.
    current_step_index: int | None = None
    step_started_at: str | None = None
    canary_started_at: str | None = None
    weights: Record | None = None
    # Analysis verdicts, newest last; the start of the current interval (and the pool).
    analysis: list[Record] = field(default_factory=list)
    analysis_baseline: Record | None = None
    eval_gate_score: float | None = None
    eval_gate_stable_score: float | None = None
    # Revisions out of traffic whose pods go after scaleDownDelaySeconds; revisions rolled back.
    retiring: list[Record] = field(default_factory=list)
    rejected_revisions: list[Record] = field(default_factory=list)
    paused: bool | None = None
    # Status keys the machine does not own, carried through as they are.
    other: Record = field(default_factory=dict)

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> RolloutState:
        """The typed state of a status dict (deep-copied: the input is never modified)."""
        data = copy.deepcopy(dict(status or {}))
        known = {name: data.pop(key) for name, key in _KEYS.items() if key in data}
        lists = {f.name for f in fields(cls) if f.name in _KEYS and f.default_factory is list}
        for name in lists & known.keys():
            known[name] = known[name] or []
        return cls(**known, other=data)

    def to_status(self) -> dict[str, Any]:
        """The status dict: known fields under their API keys, unset ones left out."""
        out = dict(self.other)
        out.update({key: getattr(self, name) for name, key in _KEYS.items()})
        return {k: v for k, v in out.items() if v is not None and v != []}

    @property
    def step_index(self) -> int:
        """The current step's index (0 before the first)."""
        return int(self.current_step_index or 0)

    # --- the few changes the recipe makes to more than one field ----------------------------

    def retire(self, name: str, reason: str, ts: str) -> None:
        """Take a revision out of traffic now; its pods go after scaleDownDelaySeconds."""
        self.unretire(name)
        self.retiring.append({"name": name, "reason": reason, "zeroWeightSince": ts})

    def unretire(self, name: str) -> None:
        """A revision coming back (the spec returned to it) is not retiring any more."""
        self.retiring = [r for r in self.retiring if r["name"] != name]

    def reject(self, name: str, reason: str, ts: str, keep: int) -> None:
        """Record a rolled-back revision (newest last, at most ``keep``): not retried."""
        rejected = [r for r in self.rejected_revisions if r["name"] != name]
        rejected.append({"name": name, "reason": reason, "time": ts})
        self.rejected_revisions = rejected[-keep:]

    def clear_canary(self) -> None:
        """No canary any more: forget where its rollout was."""
        self.canary = self.current_step_index = self.step_started_at = None
        self.canary_started_at = self.analysis_baseline = self.paused = None

