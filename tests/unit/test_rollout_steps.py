"""Each rollout step kind alone: ``rollout/steps/*.decide(step, StepContext) -> Outcome``.

Aspects covered: setWeight advances at once with replica splitting, and with an exact router
only once the canary has the pods for the weight; a timed pause waits out its duration (and is
cut short by promote, which it then consumes); an indefinite pause holds for promote; the pause
annotation holds any step; analysis counts successful intervals since the step started, pauses
after inconclusiveLimit thin intervals in a row (warning once), waits for traffic with limit 0,
and is skipped by promote; the eval gate waits for the canary's scores, then passes or rolls
back; ``steps.decide`` dispatches on the kind; ModelDeployment phases are
the schema's enum.
"""

from __future__ import annotations

from dataclasses import replace
from typing import get_args

import pytest

from kubetune.api import phases
from kubetune.api.conditions import Reason
from kubetune.api.modeldeployment import (
    AnalysisStep,
    EvalGate,
    GoldenPrompt,
    MdepPhase,
    PauseStep,
    RolloutStep,
)
from kubetune.rollout import steps
from kubetune.rollout import weights as wt
from kubetune.rollout.evalgate import EvalGateObservation
from kubetune.rollout.outcomes import (
    STEADY_REQUEUE,
    WAIT_REQUEUE,
    Advance,
    Pause,
    Rollback,
    StepContext,
    Wait,
)
from kubetune.rollout.steps import analysis, eval_gate, pause, set_weight

CTX = StepContext(
    index=2,
    elapsed=0.0,
    canary="chat-b",
    canary_weight=10,
    ready=1,
    mode=wt.GATEWAY_API,
    replicas=4,
    check_period=2.0,
)


# --- setWeight ---------------------------------------------------------------------------


def test_set_weight_waits_for_the_pods_the_weight_needs_with_an_exact_router():
    got = set_weight.decide(50, CTX)  # 50% of 4 replicas: 2 canary pods, 1 ready
    assert got == Wait(
        "scaling canary to 2 pods for 50% (step 2)", WAIT_REQUEUE, size=2, stall=True
    )


def test_set_weight_advances_once_the_pods_are_ready():
    got = set_weight.decide(50, replace(CTX, ready=2))
    assert got == Advance("weight 50%", weight=50, size=2)


def test_set_weight_with_replica_splitting_advances_at_once_the_pods_are_the_weight():
    got = set_weight.decide(50, replace(CTX, mode=wt.REPLICAS, ready=0))
    assert isinstance(got, Advance) and got.weight == 50
    assert got.size == wt.canary_replicas(wt.REPLICAS, 4, 50)


# --- pause -------------------------------------------------------------------------------


def test_timed_pause_waits_no_longer_than_a_check_period_while_the_canary_takes_traffic():
    got = pause.decide(PauseStep(duration="30s"), replace(CTX, elapsed=10.0))
    assert got == Wait("pausing 30s at step 2", 2.0)


def test_timed_pause_at_weight_zero_waits_for_the_time_left():
    got = pause.decide(PauseStep(duration="30s"), replace(CTX, elapsed=10.0, canary_weight=0))
    assert got == Wait("pausing 30s at step 2", 20.0)


def test_timed_pause_advances_when_it_elapsed_without_consuming_promote():
    got = pause.decide(PauseStep(duration="30s"), replace(CTX, elapsed=30.0, promote=True))
    assert got == Advance("pause over")


def test_timed_pause_is_cut_short_by_promote_which_it_consumes():
    got = pause.decide(PauseStep(duration="30s"), replace(CTX, elapsed=1.0, promote=True))
    assert got == Advance("pause over", consumes_promote=True)


def test_indefinite_pause_holds_until_promote():
    got = pause.decide(PauseStep(), CTX)
    assert got == Pause(
        Reason.CANARY_PAUSED, "paused at step 2 until kubetune.io/promote=true", 2.0
    )
    assert pause.decide(PauseStep(), replace(CTX, canary_weight=0)).requeue == STEADY_REQUEUE
    resumed = pause.decide(PauseStep(), replace(CTX, promote=True))
    assert resumed == Advance("resumed through the promote annotation", consumes_promote=True)


def test_pause_annotation_holds_the_current_step():
    got = pause.held(CTX)
    assert isinstance(got, Pause) and got.reason == Reason.CANARY_PAUSED
    assert "kubetune.io/pause annotation at step 2" in got.message
    assert pause.held(replace(CTX, canary_weight=0)).requeue == STEADY_REQUEUE


# --- analysis ----------------------------------------------------------------------------


def results(*verdicts: str) -> list[dict]:
    return [{"phase": v} for v in verdicts]


def test_analysis_advances_after_enough_successful_intervals():
    got = analysis.decide(
        AnalysisStep(intervals=2), CTX, results("Successful", "Inconclusive", "Successful"), 3
    )
    assert got == Advance("2 successful analysis intervals")


def test_analysis_waits_and_counts_passed_intervals():
    got = analysis.decide(AnalysisStep(intervals=2), CTX, results("Successful"), 3)
    assert got == Wait("analysis at step 2: 1/2 intervals passed", None, unpause=True)


def test_analysis_thin_intervals_count_toward_the_deadline_and_weight_zero_analyses_here():
    got = analysis.decide(AnalysisStep(), replace(CTX, canary_weight=0), results("Inconclusive"), 0)
    assert isinstance(got, Wait) and got.stall and got.analyse


def test_analysis_pauses_after_inconclusive_limit_in_a_row_and_warns_once():
    thin = results("Successful", "Error", "Inconclusive")
    got = analysis.decide(AnalysisStep(intervals=2), CTX, thin, 2)
    assert isinstance(got, Pause) and got.reason == Reason.ANALYSIS_INCONCLUSIVE and got.warn
    assert got.message.startswith("2 inconclusive analysis intervals at step 2")
    again = analysis.decide(AnalysisStep(intervals=2), replace(CTX, was_paused=True), thin, 2)
    assert isinstance(again, Pause) and not again.warn


def test_analysis_with_limit_zero_never_pauses():
    got = analysis.decide(AnalysisStep(), CTX, results(*["Inconclusive"] * 50), 0)
    assert isinstance(got, Wait)


def test_analysis_is_skipped_by_promote_which_it_consumes():
    got = analysis.decide(AnalysisStep(), replace(CTX, promote=True), results("Failed"), 0)
    assert got == Advance("analysis skipped through the promote annotation", consumes_promote=True)


def test_inconclusive_streak_counts_the_newest_thin_intervals_in_a_row():
    assert (
        analysis.inconclusive_streak(results("Inconclusive", "Successful", "Error", "Inconclusive"))
        == 2
    )
    assert analysis.inconclusive_streak(results()) == 0


# --- dispatch and vocabulary ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "kind"),
    [
        (RolloutStep(set_weight=10), Advance),
        (RolloutStep(pause=PauseStep()), Pause),
        (RolloutStep(analysis=AnalysisStep()), Wait),
    ],
)
def test_decide_dispatches_on_the_kind_the_step_sets(step, kind):
    assert isinstance(steps.decide(step, CTX), kind)


def test_modeldeployment_phases_are_the_schema_enum():
    assert get_args(MdepPhase) == phases.MDEP_PHASES


# --- the eval gate (before the first step) -------------------------------------------------


def gate() -> EvalGate:
    return EvalGate(prompts=[GoldenPrompt(prompt="2+2", expected="4")], min_score=0.8)


def test_eval_gate_waits_for_the_canarys_scores_and_names_the_runtimes_error():
    assert eval_gate.decide(gate(), None, CTX) == Wait(
        "eval gate: golden prompts against canary chat-b", WAIT_REQUEUE, stall=True
    )
    other = EvalGateObservation("chat-old", 1.0, prompts=1)  # scores of an earlier canary
    assert isinstance(eval_gate.decide(gate(), other, CTX), Wait)
    failed = EvalGateObservation("chat-b", None, error="connection refused")
    assert eval_gate.decide(gate(), failed, CTX).message.endswith(": connection refused")


def test_eval_gate_passes_or_rolls_back_on_the_score():
    passed = eval_gate.decide(gate(), EvalGateObservation("chat-b", 1.0, prompts=1), CTX)
    assert passed == Advance("eval gate passed: score 100% on 1 golden prompts")
    low = eval_gate.decide(gate(), EvalGateObservation("chat-b", 0.5, prompts=2), CTX)
    assert isinstance(low, Rollback) and low.reason == Reason.EVAL_GATE_FAILED
    assert "minScore 80%" in low.message
