"""The analysis intervals a canary is judged on: baseline, pool, measurement and the record.

While the canary takes traffic the machine looks at the current interval every check period
(``look``). An interval starts at a *baseline*: both revisions' cumulative counters at that
moment, kept in ``status.analysisBaseline`` so a restarted operator continues it. The figures
of the interval are one subtraction (``analysis.interval``). A whole interval gets a verdict
(``analysis.evaluate``); a partial one fails early only on conclusive evidence
(``analysis.fast_failure``). Intervals too thin to judge join a pool (``analysisBaseline.pool``,
the starts of the consecutive inconclusive intervals at this step, bounded by ``poolWindow``),
so the next verdict is judged on all their samples. The statistics are in ``analysis.py``; this
module only keeps the books. Pure: the runtime scraped the counters (``Observed``).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune.api.modeldeployment import AnalysisSpec
from kubetune.api.times import format_time, parse_time
from kubetune.rollout import analysis as an
from kubetune.rollout.observed import Observed, RevisionObservation

Record = dict[str, Any]

# Most interval starts a pool keeps: each holds both revisions' counters in status, so a short
# interval with a long poolWindow must not grow the object without bound.
MAX_POOLED = 20


@dataclass(frozen=True)
class Look:
    """What one look at the current interval decided."""

    requeue: float  # when to look again
    baseline: Record | None = None  # the interval's start from now on (None: unchanged)
    result: Record | None = None  # a verdict for status.analysis (None: no verdict yet)
    verdict: an.Verdict | None = None


def look(
    base: Mapping[str, Any] | None,
    *,
    canary: str,
    stable: str | None,
    step: int,
    spec: AnalysisSpec,
    observed: Observed,
    now: datetime.datetime,
    interval: float,
    check_period: float,
    expected_share: float | None,
) -> Look:
    """Judge the interval that started at ``base`` if it is due (or failing for certain)."""
    ts = format_time(now, millis=True)
    # Cumulative counters (built-in provider, and Prometheus with its default queries):
    # interval deltas and pooling. Custom Prometheus templates give interval figures.
    counted = an.uses_counters(spec)
    if base is None or (counted and canary not in (base.get("revisions") or {})):
        return Look(check_period, baseline(observed, canary, stable, step, ts))
    elapsed = _age(base.get("time"), now)
    due = elapsed >= interval
    # Pooling: the span judged starts at the oldest pooled interval still inside poolWindow
    # (cumulative counters make any span one subtraction).
    pool = live_pool(base, canary, step, an.parse_duration(spec.pool_window), now) if counted else []
    measured = measure(pool[0] if pool else base, canary, stable, observed, counted, ts)
    if isinstance(measured, str) and pool:
        # The pooled span cannot be measured (a pod restarted in it): judge this interval alone.
        pool = []
        measured = measure(base, canary, stable, observed, counted, ts)
    pooled = len(pool) + 1
    if isinstance(measured, str):
        if not due:
            return Look(check_period)
        verdict = an.Verdict(an.ERROR, measured, 0)
    else:
        # Starvation is judged on whole intervals only: just after a weight change the
        # requests completing were routed under the old weights, which reads as starvation.
        verdict = an.evaluate(
            measured, spec, expected_share=expected_share if due else None, pooled=pooled
        )
        if not due:
            # Fast failure on a partial interval: only on conclusive evidence.
            early = an.fast_failure(measured, verdict, spec, elapsed, pooled)
            if early is None:
                return Look(min(check_period, interval - elapsed))
            verdict = early
    # An interval too thin to judge joins the pool; any verdict (or an error) empties it.
    keep = (
        [*pool, {"time": base["time"], "revisions": base.get("revisions") or {}}]
        if counted and verdict.phase == an.INCONCLUSIVE
        else []
    )
    return Look(
        check_period,
        baseline(observed, canary, stable, step, ts, keep[-MAX_POOLED:]),
        record(verdict, canary, step, ts),
        verdict,
    )


def baseline(
    observed: Observed,
    canary: str,
    stable: str | None,
    step: int,
    ts: str,
    pool: list[Record] | None = None,
) -> Record:
    """A new interval starting now: both revisions' counters now (status.analysisBaseline)."""
    revisions = {}
    for name in (canary, stable):
        obs = _revision(observed, name)
        if name and obs.counters is not None:
            revisions[name] = obs.counters.to_dict()
    base: Record = {"time": ts, "revisions": revisions, "step": step}
    if pool:
        base["pool"] = pool
    return base


def live_pool(
    base: Mapping[str, Any], canary: str, step: int, window: float, now: datetime.datetime
) -> list[Record]:
    """Pooled interval starts still usable now: same step, this canary, within poolWindow."""
    if base.get("step") is not None and base.get("step") != step:
        return []
    return [
        e
        for e in base.get("pool") or []
        if canary in (e.get("revisions") or {}) and _age(e.get("time"), now) <= window
    ]


def measure(
    base: Mapping[str, Any],
    canary: str,
    stable: str | None,
    observed: Observed,
    counted: bool,
    ts: str,
) -> an.Measurement | str:
    """The figures since ``base`` (or the provider's interval figures); a string says why not."""
    if not counted:
        figures = observed.interval_metrics or {}
        if canary not in figures:
            return "no Prometheus figures for the canary"
        return an.Measurement(ts, figures[canary], figures.get(stable or ""))
    revs = base.get("revisions") or {}

    def one(name: str | None) -> an.IntervalMetrics | str:
        obs = _revision(observed, name)
        if obs.counters is None:
            return f"could not scrape revision {name}: {obs.scrape_error or 'no ready pods'}"
        before = an.RevisionCounters.from_dict(revs.get(name or "") or {})
        got = an.interval(before, obs.counters)
        return (
            got
            if got is not None
            else f"counters of revision {name} went backwards (pod restart); interval discarded"
        )

    c = one(canary)
    if isinstance(c, str):
        return c
    s = one(stable) if stable and stable in revs else None
    return an.Measurement(ts, c, s if isinstance(s, an.IntervalMetrics) else None)


def record(verdict: an.Verdict, canary: str, step: int, ts: str) -> Record:
    """The verdict as a ``status.analysis[]`` entry (api.modeldeployment.AnalysisResult)."""
    entry: Record = {
        "time": ts,
        "phase": verdict.phase,
        "samples": verdict.samples,
        "message": verdict.message,
        "revision": canary,
        "step": step,
    }
    if verdict.canary:
        entry["canary"] = verdict.canary
    if verdict.stable:
        entry["stable"] = verdict.stable
    if verdict.pooled > 1:
        entry["pooledIntervals"] = verdict.pooled
    if verdict.share is not None and verdict.expected_share is not None:
        entry["canaryShare"] = verdict.share
        entry["expectedCanaryShare"] = verdict.expected_share
        if verdict.message and "(starved)" in verdict.message:
            entry["starved"] = True
    return entry


def summary(results: Sequence[Mapping[str, Any]], min_samples: int) -> str | None:
    """The last analysis at a step in one line (figures, samples, verdict); None if none."""
    if not results:
        return None
    last = results[-1]
    c, s = last.get("canary") or {}, last.get("stable") or {}
    parts = []
    if c.get("p95LatencySeconds") is not None:
        versus = (
            f" vs stable {s['p95LatencySeconds']:.3g}s"
            if s.get("p95LatencySeconds") is not None
            else ""
        )
        parts.append(f"canary p95 {c['p95LatencySeconds']:.3g}s{versus}")
    if c.get("errorRate"):
        versus = f" vs stable {s['errorRate']:.1%}" if s.get("errorRate") is not None else ""
        parts.append(f"canary error rate {c['errorRate']:.1%}{versus}")
    samples = sorted(int(r.get("samples") or 0) for r in results)
    per = samples[len(samples) // 2]
    figures = ", ".join(parts) + (" " if parts else "")
    return (
        f"{figures}on {per} samples per interval (median of {len(results)}; minSamples {min_samples}); "
        f"last analysis {last['phase']}: {last.get('message') or ''}"
    ).strip()


def _revision(observed: Observed, name: str | None) -> RevisionObservation:
    return observed.revisions.get(name or "", RevisionObservation())


def _age(text: str | None, now: datetime.datetime) -> float:
    start = parse_time(text)
    return (now - start).total_seconds() if start else 0.0
