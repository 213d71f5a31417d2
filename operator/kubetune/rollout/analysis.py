"""Canary analysis math: Prometheus text parsing, interval deltas, quantiles and the verdict.

The built-in provider scrapes every pod of a revision (``/metrics`` of its serving engine, read
through the engine's ``MetricMap``: kubetune.rollout.metricmaps) and sums them into ``RevisionCounters`` — cumulative counters since
the pods started. An analysis interval is the *difference* of two such snapshots, the way
Prometheus' ``increase()`` works, so the verdict is about the last interval only and a bad
minute is not diluted by an hour of good history. The Prometheus provider reads the same
cumulative counters from Prometheus (``counter_queries``), so both providers share everything
from there on; only custom query templates return interval figures (``IntervalMetrics``)
directly.

The verdict (``evaluate``) compares the canary with absolute thresholds and with stable over
the same interval. Too little canary traffic is *Inconclusive*: never a silent pass (Flagger
treats "no data" as success on some providers) and never a failure (a quiet night must not roll
back a good model).

Error rates are judged with a confidence bound, not the raw ratio: an interval fails when the
canary's error rate is above ``maxErrorRate`` (or above stable's plus ``maxErrorRateIncrease``)
with 95% confidence (the lower end of the Wilson score interval). At 10% of 50 requests/s an
interval has ~50 canary requests, and two background errors out of 50 read as "4%, 3.5 points
worse than stable" -- a raw comparison rolls back about one healthy canary in seven that way
(bench/canary_detection.py measured it); the bound does not, while a canary that really fails
(30% errors) is still caught in its first interval.

Thin traffic (issue 16). Closed-loop clients send their next request only when the last one
returned, so a slow canary gets fewer requests than its weight promises and an interval-by-
interval judge never reaches minSamples. Three answers, all built on the same counters:

- Pooling (the machine): consecutive inconclusive intervals at the same step are judged
  together, from the start of the oldest one still inside ``poolWindow``; status records how
  many intervals a verdict pooled.
- The sequential latency test (``sequential_latency``): a Wald SPRT on the count of canary
  requests above ``maxLatencyRatio`` x stable's p99 (and above ``maxP95LatencySeconds``). It is
  conclusive on few requests ("8 of 8 slower than stable's p99") and, being a test martingale
  under the null, its false-alarm rate is bounded by SPRT_ALPHA however often it is looked at.
  The same test runs on decoding speed (each request's time per output token, when the engine
  exports it): end-to-end latency varies with the answer's length, so a canary that decodes 4x
  slower puts only ~20% of its requests above 1.5x stable's p99 latency, too few for the test,
  while nearly all of them are above 1.5x stable's p99 time per output token.
- Starvation (``starvation``): the canary's share of requests far below the share its weight
  promises is reported, and counts toward failure only with latency or errors pointing the
  same way; idle traffic promises too few requests to ever count as starvation.

Everything here is pure and reused by both runtimes: the operator (k8s/scraping.py) and the
local runtime feed it the text they fetched.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from prometheus_client.parser import text_string_to_metric_families

from kubetune.api.modeldeployment import AnalysisSpec
from kubetune.rollout.metricmaps import BUILTIN_MAP, MetricMap

# The built-in server's names (kept for readers of older code; the maps are the source).
REQUESTS = BUILTIN_MAP.requests.name
LATENCY = BUILTIN_MAP.latency
TTFT = BUILTIN_MAP.ttft
TPOT = BUILTIN_MAP.tpot

SUCCESSFUL = "Successful"
FAILED = "Failed"
INCONCLUSIVE = "Inconclusive"
ERROR = "Error"

# A p95 ratio check on its own would fail a healthy canary whose p95 is 9 ms against stable's
# 5 ms: scheduling noise, not a regression. The ratio only counts when the canary is also slower
# by at least this many seconds in absolute terms.
LATENCY_RATIO_FLOOR_SECONDS = 0.05

# One-sided z of the confidence an interval needs to call an error rate too high (95%).
ERROR_RATE_Z = 1.645
# The same at 99%, for a failure called on a partial interval (``fast_failure``): looked at every
# check period, it must be sure, not just suspicious.
FAST_FAIL_Z = 2.326

# Sequential latency test (``sequential_latency``). The bar is a multiple of stable's p99; a
# canary no slower than maxLatencyRatio x stable puts about 1% of its requests above it, and
# SLOW_SHARE_OK allows five times that (stable's p99 is itself estimated from a histogram over
# the same span). The alternative is "half the requests are slow". A Wald SPRT with only the
# upper bound is a test martingale under the null, so by Ville's inequality it crosses
# log(1/SPRT_ALPHA) with probability at most SPRT_ALPHA however often it is checked: with these
# numbers 6 of 6 requests above the bar are conclusive (8 of 8 by a wide margin) and each slow
# request is worth about 3.6 fast ones.
STABLE_QUANTILE = 0.99
SLOW_SHARE_OK = 0.05
SLOW_SHARE_BAD = 0.5
SPRT_ALPHA = 5e-6

# The decoding-speed bar of the sequential test is maxLatencyRatio x stable's p99 time per
# output token, and at least this much slower per token (a 2 ms/token engine is not judged on
# scheduling jitter).
TPOT_RATIO_FLOOR_SECONDS = 0.002

# The share of requests a p95 leaves above it (``latency_ratio_exceeded``).
P95_SHARE = 0.05

# Starvation (``starvation``): the canary's weight promised at least this many requests ...
STARVATION_MIN_EXPECTED = 10.0
# ... it got at most half of them, and a binomial test at the promised share says so at this level.
STARVATION_ALPHA = 1e-3
# Starvation counts toward failure only with latency or errors pointing the same way, judged on
# at least this many canary requests.
STARVATION_MIN_SERVED = 3


# --- Prometheus text exposition ----------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One line of the text exposition: metric name, labels, value."""

    name: str
    labels: Mapping[str, str]
    value: float


def parse_exposition(text: str) -> list[Sample]:
    """Parse the Prometheus text format (version 0.0.4) into samples, with prometheus_client.

    Comments (``# HELP``, ``# TYPE``) and blank lines are skipped; timestamps are read and
    dropped; label values are unescaped; ``+Inf``, ``-Inf`` and ``NaN`` are floats. A malformed
    line raises ValueError naming the line number, so a broken exporter is reported as an
    analysis *Error* with a reason rather than silently read as zero traffic.

    Each sample line goes to ``text_string_to_metric_families`` on its own: that gives the line
    number of an error, and keeps every name as written (given a whole text, the library renames
    the samples of a counter whose ``# TYPE`` name lacks ``_total`` to ``<name>_total``).
    """
    samples: list[Sample] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            parsed = [s for family in text_string_to_metric_families(line) for s in family.samples]
        except (ValueError, IndexError) as err:
            why = str(err) or "malformed"
            raise ValueError(
                f"line {number}: not a Prometheus sample ({why}): {raw[:120]!r}"
            ) from None
        samples.extend(Sample(s.name, s.labels, float(s.value)) for s in parsed)
    return samples


# --- cumulative counters of one revision -----------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """A cumulative histogram: sorted finite upper bounds with cumulative counts, plus total."""

    bounds: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()
    total: float = 0.0

    def __add__(self, other: Histogram) -> Histogram:
        if not self.bounds and not self.total:
            return other
        if not other.bounds and not other.total:
            return self
        if self.bounds != other.bounds:
            raise ValueError(
                f"histogram buckets differ between pods: {self.bounds} vs {other.bounds}"
            )
        return Histogram(
            self.bounds,
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.total + other.total,
        )

    def minus(self, before: Histogram) -> Histogram:
        """Observations since ``before`` (same buckets; a reset is detected by the caller)."""
        if not before.bounds and not before.total:
            return self
        if self.bounds != before.bounds:
            raise ValueError("histogram buckets changed between scrapes")
        return Histogram(
            self.bounds,
            tuple(a - b for a, b in zip(self.counts, before.counts, strict=True)),
            self.total - before.total,
        )

    def quantile(self, q: float) -> float | None:
        """``histogram_quantile``: linear interpolation inside the bucket holding rank q*total.

        Same rules as Prometheus: the lowest bucket interpolates from 0; a rank beyond the last
        finite bound returns that bound (the +Inf bucket has no width to interpolate in). None
        when there are no observations.
        """
        if self.total <= 0:
            return None
        rank = q * self.total
        prev_bound, prev_count = 0.0, 0.0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            if count >= rank:
                if count == prev_count:
                    return bound
                return prev_bound + (bound - prev_bound) * (rank - prev_count) / (
                    count - prev_count
                )
            prev_bound, prev_count = bound, count
        return self.bounds[-1] if self.bounds else None


@dataclass(frozen=True)
class RevisionCounters:
    """Cumulative counters of one revision (summed over its pods), whatever its engine."""

    requests: float = 0.0
    errors: float = 0.0
    latency: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    pods: int = 0
    generated_tokens: float = 0.0
    prompt_tokens: float = 0.0
    # One observation per request: its mean time per output token (empty: engine has none).
    tpot: Histogram = field(default_factory=Histogram)

    def __add__(self, other: RevisionCounters) -> RevisionCounters:
        return RevisionCounters(
            self.requests + other.requests,
            self.errors + other.errors,
            self.latency + other.latency,
            self.ttft + other.ttft,
            self.pods + other.pods,
            self.generated_tokens + other.generated_tokens,
            self.prompt_tokens + other.prompt_tokens,
            self.tpot + other.tpot,
        )

    def to_dict(self) -> dict:
        """JSON-able form (no infinities) for status.analysisBaseline."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latencyBounds": list(self.latency.bounds),
            "latencyCounts": list(self.latency.counts),
            "latencyTotal": self.latency.total,
            "ttftBounds": list(self.ttft.bounds),
            "ttftCounts": list(self.ttft.counts),
            "ttftTotal": self.ttft.total,
            "tpotBounds": list(self.tpot.bounds),
            "tpotCounts": list(self.tpot.counts),
            "tpotTotal": self.tpot.total,
            "pods": self.pods,
            "generatedTokens": self.generated_tokens,
            "promptTokens": self.prompt_tokens,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> RevisionCounters:
        """Inverse of ``to_dict``."""
        return cls(
            requests=float(data.get("requests", 0)),
            errors=float(data.get("errors", 0)),
            latency=Histogram(
                tuple(data.get("latencyBounds", ())),
                tuple(data.get("latencyCounts", ())),
                float(data.get("latencyTotal", 0)),
            ),
            ttft=Histogram(
                tuple(data.get("ttftBounds", ())),
                tuple(data.get("ttftCounts", ())),
                float(data.get("ttftTotal", 0)),
            ),
            pods=int(data.get("pods", 0)),
            generated_tokens=float(data.get("generatedTokens", 0)),
            prompt_tokens=float(data.get("promptTokens", 0)),
            tpot=Histogram(
                tuple(data.get("tpotBounds", ())),
                tuple(data.get("tpotCounts", ())),
                float(data.get("tpotTotal", 0)),
            ),
        )


def _histogram(samples: Iterable[Sample], name: str) -> Histogram:
    # Sum over every label set (models, pods) per bucket bound.
    by_bound: dict[float, float] = {}
    for s in samples:
        if s.name == f"{name}_bucket" and "le" in s.labels:
            le = float(s.labels["le"])
            by_bound[le] = by_bound.get(le, 0.0) + s.value
    if not by_bound:
        return Histogram()
    total = by_bound.pop(math.inf, None)
    finite = sorted(by_bound)
    counts = tuple(by_bound[b] for b in finite)
    if total is None:
        total = counts[-1] if counts else 0.0
    return Histogram(tuple(finite), counts, total)


def counters_from_text(text: str, metrics: MetricMap = BUILTIN_MAP) -> RevisionCounters:
    """Cumulative counters of ONE pod from its /metrics text (all models and engines summed)."""
    return counters_from_samples(parse_exposition(text), metrics)


def counters_from_samples(
    samples: list[Sample], metrics: MetricMap = BUILTIN_MAP, pods: int = 1
) -> RevisionCounters:
    """Cumulative counters from an engine's samples (every label set summed).

    The samples are a pod's exposition (built-in provider) or a revision's sums as Prometheus
    returns them (``counter_queries``: prometheus provider); either way the same counters, so
    both providers share every step after this one. ``metrics`` is the map of the engine
    (kubetune.rollout.metricmaps). When its request counter has no sample at all and the map
    has a fallback, the fallback counters are read instead (an older vLLM without HTTP metrics).
    """
    requests_rule, errors_rule = metrics.requests, metrics.errors
    if (
        metrics.fallback_requests is not None
        and metrics.fallback_errors is not None
        and not any(s.name == requests_rule.name for s in samples)
    ):
        requests_rule, errors_rule = metrics.fallback_requests, metrics.fallback_errors
    requests = errors = generated = prompt = 0.0
    for s in samples:
        if requests_rule.matches(s.name, s.labels):
            requests += s.value
        if errors_rule.matches(s.name, s.labels):
            errors += s.value
        if s.name == metrics.generated_tokens:
            generated += s.value
        elif s.name == metrics.prompt_tokens:
            prompt += s.value
    return RevisionCounters(
        requests,
        errors,
        _histogram(samples, metrics.latency),
        _histogram(samples, metrics.ttft),
        pods=pods,
        generated_tokens=generated,
        prompt_tokens=prompt,
        tpot=_histogram(samples, metrics.tpot) if metrics.tpot else Histogram(),
    )


def sum_counters(pods: Iterable[RevisionCounters]) -> RevisionCounters:
    """Sum the counters of a revision's pods."""
    total = RevisionCounters()
    for pod in pods:
        total = total + pod
    return total


# --- one interval ------------------------------------------------------------------------


@dataclass(frozen=True)
class IntervalMetrics:
    """What happened to one revision during one interval."""

    requests: float
    error_rate: float | None
    p95_latency_seconds: float | None
    ttft_p95_seconds: float | None
    # The interval's latency histogram (built-in provider only): the sequential latency test
    # counts requests above a bound, which a p95 figure alone cannot give.
    latency: Histogram | None = None
    # Tokens generated in the interval (built-in provider only; None when unknown).
    generated_tokens: float | None = None
    # Each request's mean time per output token in the interval (None: the engine exports none).
    tpot: Histogram | None = None

    def as_status(self) -> dict[str, float]:
        """The figures for status.analysis[].canary/stable (camelCase; unknowns left out)."""
        out = {"requests": float(self.requests)}
        if self.error_rate is not None:
            out["errorRate"] = round(self.error_rate, 6)
        if self.p95_latency_seconds is not None:
            out["p95LatencySeconds"] = round(self.p95_latency_seconds, 6)
        if self.ttft_p95_seconds is not None:
            out["ttftP95Seconds"] = round(self.ttft_p95_seconds, 6)
        if self.generated_tokens is not None:
            out["generatedTokens"] = float(self.generated_tokens)
        return out


def interval(before: RevisionCounters, after: RevisionCounters) -> IntervalMetrics | None:
    """The interval between two cumulative snapshots; None when a counter went backwards.

    A decrease means a pod restarted (or left) and its counters reset: the delta would be
    meaningless, so the caller discards the interval and takes ``after`` as the new baseline
    (Prometheus' increase() would extrapolate; with two points we cannot).
    """
    requests = after.requests - before.requests
    errors = after.errors - before.errors
    generated = after.generated_tokens - before.generated_tokens
    latency = (
        after.latency.minus(before.latency)
        if after.latency.bounds == before.latency.bounds or not before.latency.bounds
        else None
    )
    ttft = (
        after.ttft.minus(before.ttft)
        if after.ttft.bounds == before.ttft.bounds or not before.ttft.bounds
        else None
    )
    if (
        requests < 0
        or errors < 0
        or latency is None
        or ttft is None
        or latency.total < 0
        or ttft.total < 0
    ):
        return None
    return IntervalMetrics(
        requests=requests,
        error_rate=(errors / requests) if requests > 0 else None,
        p95_latency_seconds=latency.quantile(0.95),
        ttft_p95_seconds=ttft.quantile(0.95),
        latency=latency,
        generated_tokens=generated if generated >= 0 else None,
        tpot=_tpot_interval(before.tpot, after.tpot),
    )


def _tpot_interval(before: Histogram, after: Histogram) -> Histogram | None:
    # Decoding speed is optional evidence: buckets that changed (an engine upgrade) or went
    # backwards leave the interval without it instead of discarding the interval.
    if not after.bounds or (before.bounds and before.bounds != after.bounds):
        return None
    got = after.minus(before)
    return got if got.total >= 0 and all(c >= 0 for c in got.counts) else None


@dataclass(frozen=True)
class Measurement:
    """One analysis interval's figures for the canary and (when it has pods) stable."""

    time: str
    canary: IntervalMetrics
    stable: IntervalMetrics | None = None


@dataclass(frozen=True)
class Verdict:
    """The outcome of one interval: phase, reason, and the figures it was judged on."""

    phase: str
    message: str
    samples: int
    canary: dict[str, float] | None = None
    stable: dict[str, float] | None = None
    # Failed on evidence that needs no full interval (sequential latency test, starvation with
    # latency or errors pointing the same way): the machine may act on it mid-interval.
    early: bool = False
    # Consecutive inconclusive intervals whose samples this verdict used (1: not pooled).
    pooled: int = 1
    # The canary's observed share of requests and the share its weight promises (starvation).
    share: float | None = None
    expected_share: float | None = None


def wilson_lower(errors: float, total: float, z: float = ERROR_RATE_Z) -> float:
    """Lower end of the Wilson score interval of ``errors / total`` (0 without data).

    Unlike the normal approximation it behaves with few requests and rates near 0, which is
    exactly a canary's situation.
    """
    if total <= 0:
        return 0.0
    p = min(1.0, max(0.0, errors / total))
    denom = 1 + z * z / total
    centre = p + z * z / (2 * total)
    margin = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return max(0.0, (centre - margin) / denom)


def log_binomial_cdf(k: float, n: float, p: float) -> float:
    """``log P(X <= k)`` for X ~ Binomial(n, p) (exact sum in log space; -inf when k < 0)."""
    k, n = int(math.floor(k)), int(round(n))
    if k < 0:
        return -math.inf
    if k >= n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return -math.inf
    lp, lq = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(k + 1)
    ]
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def slow_count(hist: Histogram | None, seconds: float) -> tuple[float, float] | None:
    """``(requests slower than the first bucket bound >= seconds, bound)``; None if no bound.

    Counting above a bucket *bound* at or beyond the bar (never interpolating inside a bucket)
    only ever undercounts the slow requests, so the test below stays conservative.
    """
    if hist is None or hist.total <= 0:
        return None
    for bound, count in zip(hist.bounds, hist.counts, strict=True):
        if bound >= seconds:
            return max(0.0, hist.total - count), bound
    return None


def sprt_llr(slow: float, total: float) -> float:
    """Log-likelihood ratio of "slow share is SLOW_SHARE_BAD" over "it is SLOW_SHARE_OK"."""
    fast = max(0.0, total - slow)
    return slow * math.log(SLOW_SHARE_BAD / SLOW_SHARE_OK) + fast * math.log(
        (1 - SLOW_SHARE_BAD) / (1 - SLOW_SHARE_OK)
    )


SPRT_BOUND = math.log(1 / SPRT_ALPHA)


def sequential_latency(
    canary: IntervalMetrics, stable: IntervalMetrics | None, spec: AnalysisSpec
) -> list[str]:
    """Latency failures that are conclusive on however few canary requests (module docstring).

    Three bars, each a one-sided Wald SPRT on the count of canary requests above it:
    - relative: ``maxLatencyRatio`` x stable's p99 (and at least LATENCY_RATIO_FLOOR_SECONDS
      above it), when stable saw minSamples requests over the same span;
    - decoding speed: ``maxLatencyRatio`` x stable's p99 time per output token (and at least
      TPOT_RATIO_FLOOR_SECONDS above it), when both revisions' engines export it and stable has
      minSamples such observations;
    - absolute: ``maxP95LatencySeconds``.
    A healthy canary puts at most SLOW_SHARE_OK of its requests above any bar, so each test
    crosses its bound with probability at most SPRT_ALPHA however often it is looked at.
    """
    thr = spec.thresholds
    # (the canary's histogram, the bar, what the bar is, how a request is slow)
    bars: list[tuple[Histogram | None, float, str, str]] = []
    stable_ok = (
        thr.max_latency_ratio is not None
        and stable is not None
        and stable.requests >= spec.min_samples
    )
    if stable_ok and stable is not None and stable.latency is not None:
        sp99 = stable.latency.quantile(STABLE_QUANTILE)
        if sp99 is not None:
            bar = max(thr.max_latency_ratio * sp99, sp99 + LATENCY_RATIO_FLOOR_SECONDS)
            what = f"{thr.max_latency_ratio}x stable's p99 {sp99:.3f}s"
            bars.append((canary.latency, bar, what, "slower than {bound:g}s"))
    if (
        stable_ok
        and stable is not None
        and stable.tpot is not None
        and stable.tpot.total >= spec.min_samples
    ):
        sp99 = stable.tpot.quantile(STABLE_QUANTILE)
        if sp99 is not None:
            bar = max(thr.max_latency_ratio * sp99, sp99 + TPOT_RATIO_FLOOR_SECONDS)
            what = (
                f"{thr.max_latency_ratio}x stable's p99 time per output token {sp99 * 1000:.1f} ms"
            )
            bars.append((canary.tpot, bar, what, "decoding slower than {ms:g} ms per token"))
    if thr.max_p95_latency_seconds is not None:
        bars.append(
            (
                canary.latency,
                thr.max_p95_latency_seconds,
                "maxP95LatencySeconds",
                "slower than {bound:g}s",
            )
        )
    out: list[str] = []
    for hist, bar, what, slow_how in bars:
        got = slow_count(hist, bar)
        if got is None or hist is None:
            continue
        slow, bound = got
        if sprt_llr(slow, hist.total) >= SPRT_BOUND:
            how = slow_how.format(bound=bound, ms=round(bound * 1000, 3))
            out.append(
                f"{int(slow)} of {int(hist.total)} canary requests {how} ({what}): "
                f"conclusive (sequential test, false alarm <= {SPRT_ALPHA:g})"
            )
    return out


def latency_ratio_exceeded(
    canary: IntervalMetrics, stable: IntervalMetrics, ratio: float, z: float = ERROR_RATE_Z
) -> str | None:
    """Why the canary's p95 exceeds ``ratio`` x stable's, with 95% confidence; None if it does not.

    "p95 above the bar" means "more than 5% of the requests above the bar", and that share is
    judged like an error rate: the lower Wilson bound of the canary requests above the first
    histogram bound at or beyond the bar must exceed 5%. Comparing two interpolated p95 figures
    instead, on the ~20 requests of a thin interval, rolled back several percent of healthy
    canaries whose latency varies with the answer length (bench/canary_detection.py, thin
    traffic). Without histograms (the Prometheus provider) the figures are compared as they are.
    """
    p95, sp95 = canary.p95_latency_seconds, stable.p95_latency_seconds
    if p95 is None or sp95 is None:
        return None
    bar = max(ratio * sp95, sp95 + LATENCY_RATIO_FLOOR_SECONDS)
    got = slow_count(canary.latency, bar)
    if got is None:
        if p95 > bar:
            return f"p95 latency {p95:.3f}s > {ratio}x stable's {sp95:.3f}s"
        return None
    slow, bound = got
    total = canary.latency.total if canary.latency else 0.0
    low = wilson_lower(slow, total, z)
    if low > P95_SHARE:
        confidence = "99%" if z > ERROR_RATE_Z else "95%"
        return (
            f"p95 latency {p95:.3f}s > {ratio}x stable's {sp95:.3f}s ({int(slow)} of {int(total)} "
            f"requests slower than {bound:g}s: at least {low:.0%} with {confidence} confidence)"
        )
    return None


def starvation(
    canary: IntervalMetrics, stable: IntervalMetrics | None, expected_share: float | None
) -> tuple[float, bool] | None:
    """``(observed canary share, starved)``; None when there is nothing to compare.

    Starved: the weight promised enough canary requests for a verdict-sized sample (at least
    STARVATION_MIN_EXPECTED), the canary got at most half of that, and a binomial test at the
    promised share makes so few requests improbable (below STARVATION_ALPHA). Idle traffic
    promises few requests, so a canary that is quiet because everything is quiet is never starved.
    """
    if stable is None or not expected_share or expected_share >= 1.0:
        return None
    total = canary.requests + stable.requests
    if total <= 0:
        return None
    share = canary.requests / total
    expected = total * expected_share
    starved = (
        expected >= STARVATION_MIN_EXPECTED
        and canary.requests <= expected / 2
        and log_binomial_cdf(canary.requests, total, expected_share) < math.log(STARVATION_ALPHA)
    )
    return share, starved


def _pointing_the_same_way(
    canary: IntervalMetrics, stable: IntervalMetrics, spec: AnalysisSpec
) -> str | None:
    # Starvation's partner evidence, judged on however few requests the canary did serve (at
    # least STARVATION_MIN_SERVED) with the same 95% bounds as a full interval: more than 5% of
    # them slower than maxLatencyRatio x stable's p95, or an error rate above maxErrorRate.
    if canary.requests < STARVATION_MIN_SERVED:
        return None
    thr = spec.thresholds
    if thr.max_latency_ratio is not None:
        slower = latency_ratio_exceeded(canary, stable, thr.max_latency_ratio)
        if slower:
            return slower
    err = canary.error_rate or 0.0
    low = wilson_lower(err * canary.requests, canary.requests)
    if low > thr.max_error_rate:
        return f"error rate {err:.1%} > maxErrorRate {thr.max_error_rate:.1%} (at least {low:.1%} with 95% confidence)"
    return None


def evaluate(
    measurement: Measurement,
    spec: AnalysisSpec,
    *,
    expected_share: float | None = None,
    pooled: int = 1,
) -> Verdict:
    """Judge one interval (or ``pooled`` consecutive ones): Successful, Failed or Inconclusive.

    Order matters for the message only: every failed check is listed, so a user sees both
    "error rate 12% > 5%" and "p95 2.1 s > 1.5x stable" at once. Checks against stable run only
    when stable itself saw at least minSamples requests in the interval — comparing with a
    handful of stable requests would be noise — and, when the spec asks for such a comparison
    (maxLatencyRatio, maxErrorRateIncrease), a canary cannot pass without it: Inconclusive.

    Below minSamples two kinds of evidence are conclusive all the same (``Verdict.early``): the
    sequential latency test, and starvation with latency or errors pointing the same way.
    ``expected_share`` is the canary's share of requests its weight promises (None: unknown,
    no starvation check).
    """
    canary, stable = measurement.canary, measurement.stable
    samples = int(canary.requests)
    figures = {"canary": canary.as_status(), "stable": stable.as_status() if stable else None}
    starving = starvation(canary, stable, expected_share)
    share = starving[0] if starving else None
    starved = bool(starving and starving[1])
    extra = {
        "pooled": pooled,
        "share": round(share, 4) if share is not None else None,
        "expected_share": expected_share if starving else None,
    }
    early: list[str] = sequential_latency(canary, stable, spec)
    starved_note = ""
    if starved:
        assert share is not None and expected_share is not None and stable is not None
        starved_note = f"canary got {share:.1%} of requests, its weight promises {expected_share:.0%} (starved)"
        partner = _pointing_the_same_way(canary, stable, spec)
        if partner:
            early.append(f"{starved_note} and {partner}")
    if canary.requests < spec.min_samples:
        if early:
            return Verdict(FAILED, "; ".join(early), samples, **figures, early=True, **extra)
        where = "in the interval" if pooled <= 1 else f"in {pooled} pooled intervals"
        message = f"only {samples} canary requests {where} (minSamples {spec.min_samples}): not enough to judge"
        if starved_note:
            message += f"; {starved_note}"
        return Verdict(INCONCLUSIVE, message, samples, **figures, **extra)
    thr = spec.thresholds
    failures: list[str] = []
    err = canary.error_rate or 0.0
    # What the canary's error rate is at least, with 95% confidence (module docstring).
    err_low = wilson_lower(err * canary.requests, canary.requests)
    if err > thr.max_error_rate and err_low > thr.max_error_rate:
        failures.append(
            f"error rate {err:.1%} > maxErrorRate {thr.max_error_rate:.1%} (at least {err_low:.1%} with 95% confidence)"
        )
    p95 = canary.p95_latency_seconds
    if (
        thr.max_p95_latency_seconds is not None
        and p95 is not None
        and p95 > thr.max_p95_latency_seconds
    ):
        failures.append(
            f"p95 latency {p95:.3f}s > maxP95LatencySeconds {thr.max_p95_latency_seconds}s"
        )
    ttft = canary.ttft_p95_seconds
    if (
        thr.max_ttft_p95_seconds is not None
        and ttft is not None
        and ttft > thr.max_ttft_p95_seconds
    ):
        failures.append(
            f"p95 time to first token {ttft:.3f}s > maxTtftP95Seconds {thr.max_ttft_p95_seconds}s"
        )
    if stable is not None and stable.requests >= spec.min_samples:
        stable_err = stable.error_rate or 0.0
        if (
            thr.max_error_rate_increase is not None
            and err_low - stable_err > thr.max_error_rate_increase
        ):
            failures.append(
                f"error rate {err:.1%} exceeds stable's {stable_err:.1%} by more than {thr.max_error_rate_increase:.1%}"
                f" (at least {err_low:.1%} with 95% confidence)"
            )
        if thr.max_latency_ratio is not None:
            slower = latency_ratio_exceeded(canary, stable, thr.max_latency_ratio)
            if slower:
                failures.append(slower)
    pooled_note = f" ({pooled} intervals pooled)" if pooled > 1 else ""
    if failures or early:
        return Verdict(
            FAILED,
            "; ".join([*failures, *early]) + pooled_note,
            samples,
            **figures,
            early=bool(early),
            **extra,
        )
    # No pass without the comparison the spec asks for. Stable served fewer than minSamples
    # requests over the span (closed-loop clients stuck on a slow canary starve stable, not the
    # canary): the relative checks could not run, so a canary 10x slower than stable would pass
    # on the absolute thresholds alone. Found by the real-Prometheus test (issue 13); the pool
    # keeps growing until stable has enough requests too.
    relative = [
        name
        for name, value in (
            ("maxLatencyRatio", thr.max_latency_ratio),
            ("maxErrorRateIncrease", thr.max_error_rate_increase),
        )
        if value is not None
    ]
    if (stable is None or stable.requests < spec.min_samples) and relative:
        where = "in the interval" if pooled <= 1 else f"in {pooled} pooled intervals"
        return Verdict(
            INCONCLUSIVE,
            f"only {int(stable.requests) if stable else 0} stable requests {where} (minSamples {spec.min_samples}):"
            f" {' and '.join(relative)} cannot compare the canary's {samples} with stable yet",
            samples,
            **figures,
            **extra,
        )
    message = f"{samples} canary requests within thresholds{pooled_note}"
    if starved_note:
        message += f"; {starved_note}"
    return Verdict(SUCCESSFUL, message, samples, **figures, **extra)


def fast_failure(
    measured: Measurement,
    verdict: Verdict,
    spec: AnalysisSpec,
    elapsed: float,
    pooled: int = 1,
) -> Verdict | None:
    """The Failed verdict of a *partial* interval when the evidence is already conclusive.

    A pass needs a whole interval, but a failure does not: between intervals the machine asks
    this every check period. ``verdict`` is ``evaluate``'s on the partial figures ``measured``
    (``elapsed`` seconds of the interval, ``pooled`` intervals). It fails early when the canary's
    error rate is 99% certainly above ``maxErrorRate`` (Wilson lower bound), when the share of
    canary requests above ``maxLatencyRatio`` x stable's p95 is 99% certainly above 5%, or when
    the verdict's own evidence is conclusive on few samples (``Verdict.early``: the sequential
    latency test, starvation with latency or errors pointing the same way). None: keep waiting.
    That turns "rollback after interval x failureLimit" (Flagger: 5 minutes by default) into
    seconds for a canary that returns errors or is far slower than stable, without failing a
    healthy canary on noise.
    """
    c, s = measured.canary, measured.stable
    errors = (c.error_rate or 0.0) * c.requests
    certain_errors = (
        c.requests >= spec.min_samples
        and wilson_lower(errors, c.requests, FAST_FAIL_Z) > spec.thresholds.max_error_rate
    )
    certain_latency = (
        c.requests >= spec.min_samples
        and s is not None
        and s.requests >= spec.min_samples
        and spec.thresholds.max_latency_ratio is not None
        and latency_ratio_exceeded(c, s, spec.thresholds.max_latency_ratio, FAST_FAIL_Z)
    )
    early = verdict.phase == FAILED and verdict.early
    if not (certain_errors or certain_latency or early):
        return None
    how = "conclusive" if early and not certain_errors else "99% certain"
    message = verdict.message
    if certain_latency and not certain_errors and not early:
        message = str(certain_latency) + (f" ({pooled} intervals pooled)" if pooled > 1 else "")
    return replace(
        verdict,
        phase=FAILED,
        message=f"{message} (fast failure: {how} within {elapsed:.1f}s)",
    )


# --- Prometheus query provider (pure part: the query text) -------------------------------
#
# The contract with the scrape (docs/contracts.md, "Prometheus labels"): every series scraped
# from a serving pod carries ``namespace`` (the pod's namespace) and ``revision`` (the pod's
# ``kubetune.io/revision`` label). A Prometheus Operator PodMonitor gives ``namespace`` to every
# target and the chart's PodMonitor (serverMetrics.podMonitor) relabels the pod label to
# ``revision``; a hand-written scrape config needs the same relabeling.

# Inside the braces of every default query; {{...}} are substituted by ``render_query``.
_SEL_INNER = 'namespace="{{namespace}}",revision="{{revision}}"'
_SEL = "{" + _SEL_INNER + "}"
# ``counter_queries``' key for the scrape targets (``up``), apart from the metric names.
TARGETS = "up"


def counter_queries(metrics: MetricMap = BUILTIN_MAP) -> dict[str, str]:
    """The prometheus provider's default: a revision's cumulative counters as instant sums.

    ``{sample name: PromQL}``: every result sample is named after its key and fed to
    ``counters_from_samples`` with the same map, so the engine's counter rules (labels,
    exclusions, the fallback of an old vLLM) apply exactly as they do to a scrape: the sums keep
    the labels the rules look at. ``TARGETS`` (``up``) has one sample per scrape target.

    Not ``increase()`` over the interval: it extrapolates to the window's edges, which inflates
    the counts of a short window (2 samples 1 s apart in a 2 s window count double) and would
    void the sequential test's false-alarm bound. Instant sums of the raw counters are the
    built-in provider's snapshots; the machine takes their differences.
    """
    rules = [metrics.requests, metrics.errors, metrics.fallback_requests, metrics.fallback_errors]
    by_name: dict[str, set[str]] = {}
    for rule in rules:
        if rule is not None:
            by_name.setdefault(rule.name, set()).update(rule.labels, rule.exclude)
    queries = {TARGETS: TARGETS + _SEL}
    for name, keys in by_name.items():
        by = f" by ({', '.join(sorted(keys))})" if keys else ""
        queries[name] = f"sum{by} ({name}{_SEL})"
    for name in (metrics.generated_tokens, metrics.prompt_tokens):
        queries[name] = f"sum({name}{_SEL})"
    for histogram in (metrics.latency, metrics.ttft, metrics.tpot):
        if histogram is None:
            continue
        queries[histogram + "_bucket"] = f"sum by (le) ({histogram}_bucket{_SEL})"
    return queries


def counters_from_prometheus(
    namespace: str,
    revision: str,
    results: Mapping[str, list[Sample]],
    metrics: MetricMap = BUILTIN_MAP,
) -> tuple[RevisionCounters | None, str | None]:
    """A revision's counters from the results of ``counter_queries``: ``(counters, None)`` or ``(None, why)``.

    Like the built-in provider, a revision Prometheus cannot scrape completely is an error, not a
    smaller sum: no target at all means the scrape does not give the labels the queries select
    (the bug of issue 13: nothing created ``revision``), a target down would make the sum go
    backwards. Result samples come back without a metric name (``sum`` drops it); each gets its
    query's key.
    """
    where = f'namespace="{namespace}", revision="{revision}"'
    targets = results.get(TARGETS) or []
    if not targets:
        return None, (
            f"Prometheus scrapes no target labelled {where}: the serving pods' metrics need the "
            "labels namespace and revision (chart value serverMetrics.podMonitor.enabled, or "
            "relabel the pod label kubetune.io/revision to revision; docs/operations.md)"
        )
    down = sum(1 for t in targets if t.value != 1)
    if down:
        return None, f"{down} of {len(targets)} Prometheus targets labelled {where} are down"
    named = [
        Sample(name, s.labels, s.value)
        for name, samples in results.items()
        if name != TARGETS
        for s in samples
    ]
    return counters_from_samples(named, metrics, pods=len(targets)), None


def uses_counters(spec: AnalysisSpec) -> bool:
    """True when the analysis works on cumulative counters (and so pools and runs the SPRT).

    The built-in provider always does; the prometheus provider does unless a custom query
    template is set (those return interval figures of the user's own metrics).
    """
    if spec.provider != "prometheus" or spec.prometheus is None:
        return True
    p = spec.prometheus
    return not (p.requests_query or p.error_rate_query or p.latency_p95_query or p.ttft_p95_query)


def _increase(selector: str) -> str:
    return "sum(increase(" + selector + "[{{interval}}]))"


def _p95(histogram: str) -> str:
    return (
        "histogram_quantile(0.95, sum by (le) (increase("
        + histogram
        + "_bucket"
        + _SEL
        + "[{{interval}}])))"
    )


def default_queries(metrics: MetricMap = BUILTIN_MAP) -> dict[str, str]:
    """Interval templates for the ones a user's custom templates leave unset (``uses_counters`` False).

    The same quantities as the built-in provider reads from a scrape: requests and errors from
    the map's counter rules, p95 from its histograms. A map's fallback counters (an old vLLM
    without HTTP metrics) have no default query: set ``requestsQuery``/``errorRateQuery``.
    Judged interval by interval as returned: no histogram, so no pooling and no sequential test.
    """
    requests = _increase(metrics.requests.selector(_SEL_INNER))
    return {
        "requests": requests,
        "errorRate": _increase(metrics.errors.selector(_SEL_INNER)) + " / " + requests,
        "latencyP95": _p95(metrics.latency),
        "ttftP95": _p95(metrics.ttft),
    }


DEFAULT_QUERIES = default_queries(BUILTIN_MAP)


def render_query(template: str, namespace: str, revision: str, interval_text: str = "") -> str:
    """Substitute ``{{namespace}}``, ``{{revision}}`` and ``{{interval}}`` in a PromQL template.

    The queries select by the ``namespace`` and ``revision`` labels (the contract above).
    """
    return (
        template.replace("{{namespace}}", namespace)
        .replace("{{revision}}", revision)
        .replace("{{interval}}", interval_text)
    )


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``10s``, ``1m30s``, ``250ms``, ``2h`` (spec DURATION_PATTERN)."""
    total = 0.0
    pos = 0
    for match in re.finditer(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", text):
        if match.start() != pos:
            break
        pos = match.end()
        value, unit = float(match.group(1)), match.group(2)
        total += value * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if pos != len(text) or not text:
        raise ValueError(f"bad duration {text!r}: use e.g. 30s, 5m, 1h30m, 250ms")
    return total
