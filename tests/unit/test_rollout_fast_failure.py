"""Fast failure on a partial analysis interval, alone: ``analysis.fast_failure``.

Aspects covered: an error rate 99% certainly above maxErrorRate fails at once; the same raw rate
on noise-sized samples does not, nor anything below minSamples; a latency share 99% certainly
above 5% of maxLatencyRatio x stable's p95 fails, and names pooled intervals; a verdict whose
own evidence is conclusive early (sequential test) fails whatever the error rate; a healthy
partial interval never fails.
"""

from __future__ import annotations

import pytest

from kubetune.api.modeldeployment import AnalysisSpec, Thresholds
from kubetune.rollout import analysis as an

BOUNDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SPEC = AnalysisSpec(min_samples=20)


def figures(requests: float, errors: float = 0.0, latency: float = 0.04) -> an.IntervalMetrics:
    """One partial interval's figures, every request observed at ``latency`` seconds."""
    hist = an.Histogram(BOUNDS, tuple(requests if b >= latency else 0.0 for b in BOUNDS), requests)
    zero = an.RevisionCounters(
        0,
        0,
        an.Histogram(BOUNDS, (0.0,) * len(BOUNDS), 0),
        an.Histogram(BOUNDS, (0.0,) * len(BOUNDS), 0),
    )
    got = an.interval(zero, an.RevisionCounters(requests, errors, hist, hist, pods=1))
    assert got is not None
    return got


def judge(
    canary: an.IntervalMetrics,
    stable: an.IntervalMetrics | None = None,
    spec: AnalysisSpec = SPEC,
    pooled: int = 1,
):
    measured = an.Measurement("t", canary, stable)
    verdict = an.evaluate(measured, spec, pooled=pooled)
    return an.fast_failure(measured, verdict, spec, 2.0, pooled)


@pytest.mark.parametrize(
    ("requests", "errors", "fails"),
    [
        (25, 20, True),  # 80% of 25: certain
        (25, 2, False),  # 8% raw, over 5%, but not certainly so
        (10, 10, False),  # below minSamples: never, however bad
        (200, 0, False),  # healthy
    ],
)
def test_error_rate_fails_early_only_when_99_percent_certain(requests, errors, fails):
    got = judge(figures(requests, errors))
    assert (got is not None) == fails
    if fails:
        assert got.phase == an.FAILED
        assert got.message.endswith("(fast failure: 99% certain within 2.0s)")


def test_latency_ratio_fails_early_and_names_the_pooled_intervals():
    spec = AnalysisSpec(min_samples=20, thresholds=Thresholds(max_latency_ratio=2.0))
    got = judge(figures(40, latency=2.0), figures(400, latency=0.04), spec, pooled=3)
    assert got is not None and got.phase == an.FAILED
    assert "x stable's" in got.message and "(3 intervals pooled)" in got.message
    assert judge(figures(40, latency=0.04), figures(400, latency=0.04), spec) is None


def test_a_verdict_conclusive_early_fails_whatever_the_error_rate():
    measured = an.Measurement("t", figures(8, latency=2.0), figures(400))
    early = an.Verdict(an.FAILED, "8 of 8 slower", 8, early=True)
    got = an.fast_failure(measured, early, SPEC, 1.5)
    assert got is not None and got.message == "8 of 8 slower (fast failure: conclusive within 1.5s)"
    # The same figures without conclusive evidence wait for the interval.
    assert an.fast_failure(measured, an.Verdict(an.INCONCLUSIVE, "thin", 8), SPEC, 1.5) is None
