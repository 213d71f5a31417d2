"""The analysis intervals' books alone: ``rollout.intervals.look`` and its helpers.

Aspects covered: the first look starts an interval (baseline of both revisions' counters); a
partial interval is looked at again within the check period and never passes; a whole thin
interval is Inconclusive and joins the pool, and the next verdict pools it; a pool from another
step is dropped; the one-line summary the progress deadline quotes.
"""

from __future__ import annotations

import datetime

from kubetune.api.modeldeployment import AnalysisSpec
from kubetune.rollout import analysis as an
from kubetune.rollout import intervals
from kubetune.rollout.observed import Observed, RevisionObservation
from kubetune.rollout.revisions import ModelProblem
from tests.unit.test_rollout_machine import counters

T0 = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
SPEC = AnalysisSpec(interval="10s", min_samples=20)


def observed(canary: float, stable: float) -> Observed:
    revs = {
        "chat-b": RevisionObservation(1, 1, True, counters=counters(canary)),
        "chat-a": RevisionObservation(4, 4, True, counters=counters(stable)),
    }
    return Observed(model=ModelProblem("Pending", "unused"), revisions=revs)


def look(base, obs: Observed, seconds: float, step: int = 1) -> intervals.Look:
    return intervals.look(
        base,
        canary="chat-b",
        stable="chat-a",
        step=step,
        spec=SPEC,
        observed=obs,
        now=T0 + datetime.timedelta(seconds=seconds),
        interval=10.0,
        check_period=2.0,
        expected_share=0.1,
    )


def test_first_look_starts_an_interval_with_both_revisions_counters():
    got = look(None, observed(5, 50), 0)
    assert got.requeue == 2.0 and got.verdict is None
    assert got.baseline["time"] == "2026-01-01T12:00:00.000Z" and got.baseline["step"] == 1
    assert set(got.baseline["revisions"]) == {"chat-a", "chat-b"}


def test_a_partial_interval_is_looked_at_again_and_never_passes():
    base = look(None, observed(0, 0), 0).baseline
    got = look(base, observed(100, 900), 9)
    assert got.verdict is None and got.baseline is None and got.requeue == 1.0


def test_a_thin_whole_interval_is_inconclusive_joins_the_pool_and_is_pooled_next():
    base = look(None, observed(0, 0), 0).baseline
    thin = look(base, observed(5, 50), 10)
    assert thin.verdict.phase == an.INCONCLUSIVE and thin.result["step"] == 1
    assert [e["time"] for e in thin.baseline["pool"]] == [base["time"]]
    pooled = look(thin.baseline, observed(30, 300), 20)
    assert pooled.verdict.phase == an.SUCCESSFUL and pooled.result["pooledIntervals"] == 2
    assert "pool" not in pooled.baseline  # a verdict empties the pool
    # A new step starts a new pool.
    assert intervals.live_pool(thin.baseline, "chat-b", 2, 60.0, T0) == []


def test_summary_quotes_the_last_analysis_and_the_median_samples():
    results = [
        {
            "phase": "Inconclusive",
            "samples": 3,
            "message": "thin",
            "canary": {"p95LatencySeconds": 2.4},
        },
        {"phase": "Inconclusive", "samples": 5, "message": "thin again"},
    ]
    text = intervals.summary(results, 20)
    assert (
        text
        == "on 5 samples per interval (median of 2; minSamples 20); last analysis Inconclusive: thin again"
    )
    assert intervals.summary([], 20) is None
