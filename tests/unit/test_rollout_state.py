"""The rollout machine's typed working state: ``rollout.state.RolloutState``.

Aspects covered: a status round-trips through the typed state (keys it does not own carried
through); unset fields are left out of the status; the input status is never modified; null
lists read as empty; retiring, rejecting and clearing the canary.
"""

from __future__ import annotations

import copy

from kubetune.rollout.state import RolloutState

STATUS = {
    "phase": "Progressing",
    "stable": {"name": "chat-a", "readyReplicas": 4},
    "canary": {"name": "chat-b"},
    "currentStepIndex": 2,
    "stepStartedAt": "2026-01-01T12:00:00.000Z",
    "analysis": [{"time": "2026-01-01T12:00:10.000Z", "phase": "Successful"}],
    "retiring": [],
    "futureField": {"kept": True},
}


def test_a_status_round_trips_through_the_typed_state():
    state = RolloutState.from_status(STATUS)
    assert state.canary == {"name": "chat-b"} and state.step_index == 2
    assert state.other == {"futureField": {"kept": True}}
    assert state.to_status() == {k: v for k, v in STATUS.items() if v != []}


def test_unset_fields_are_left_out_and_the_input_is_not_modified():
    before = copy.deepcopy(STATUS)
    state = RolloutState.from_status(STATUS)
    state.canary = state.current_step_index = state.step_started_at = None
    state.stable["replicas"] = 4
    assert set(state.to_status()) == {"phase", "stable", "analysis", "futureField"}
    assert STATUS == before


def test_null_lists_read_as_empty_and_an_empty_status_is_empty():
    state = RolloutState.from_status({"retiring": None, "rejectedRevisions": None})
    assert state.retiring == [] and state.rejected_revisions == [] and state.step_index == 0
    assert RolloutState.from_status(None).to_status() == {}


def test_retire_reject_and_clear_the_canary():
    state = RolloutState.from_status(STATUS)
    state.retire("chat-b", "RolledBack", "t1")
    state.retire("chat-b", "RolledBack", "t2")  # once, with the newer time
    assert state.retiring == [{"name": "chat-b", "reason": "RolledBack", "zeroWeightSince": "t2"}]
    for n in range(3):
        state.reject(f"chat-{n}", "AnalysisFailed: errors", "t", keep=2)
    assert [r["name"] for r in state.rejected_revisions] == ["chat-1", "chat-2"]
    state.clear_canary()
    assert state.canary is None and state.step_index == 0 and state.stable["name"] == "chat-a"
    state.unretire("chat-b")
    assert state.retiring == []
