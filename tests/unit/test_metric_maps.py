"""Metric maps: each serving engine's /metrics read into the same analysis quantities.

Covers:
- the vLLM map on a real vLLM scrape (tests/unit/fixtures/vllm_metrics_opt125m.txt, sourced in
  its header): requests from vllm:request_success_total (that vLLM has no HTTP metrics), the
  e2e latency and TTFT histograms with vLLM's own buckets, generated and prompt tokens;
- the vLLM map on vLLM's HTTP metrics (fixtures/vllm_http_metrics.txt, quoted by vLLM's design
  doc): requests from http_requests_total on /v1 routes, preferred over the fallback;
- how a vLLM error is counted: a 5xx status on a /v1 route; without HTTP metrics, the
  finished_reason "error"; an aborted request (client went away) is no error;
- the builtin map reads kubetune_server names only (a vLLM scrape read as builtin is empty,
  which is why each revision is read with its own engine's map);
- two scrapes of a vLLM revision make an interval that the analysis judges like any other;
- the Prometheus provider's default queries per engine (builtin unchanged).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kubetune.api.modeldeployment import AnalysisSpec
from kubetune.rollout import analysis as an
from kubetune.rollout.metricmaps import (
    BUILTIN_MAP,
    VLLM_MAP,
    CounterRule,
    metric_map,
)

FIXTURES = Path(__file__).parent / "fixtures"
OPT125M = (FIXTURES / "vllm_metrics_opt125m.txt").read_text()
HTTP = (FIXTURES / "vllm_http_metrics.txt").read_text()

# vLLM's e2e latency and TTFT buckets as the fixture's server exported them.
VLLM_E2E_BOUNDS = (1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
VLLM_TTFT_BOUNDS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip


def test_fixture_headers_name_their_source():
    for text in (OPT125M, HTTP):
        header = " ".join(line for line in text.splitlines()[:6] if line.startswith("# "))
        assert "Source: github.com/" in header and "at commit" in header and "unchanged" in header


def test_vllm_map_reads_a_real_vllm_scrape():
    c = an.counters_from_text(OPT125M, VLLM_MAP)
    # One completion, finished by length: no HTTP metrics in this vLLM, so the fallback counts it.
    assert (c.requests, c.errors) == (1.0, 0.0)
    assert c.latency.bounds == VLLM_E2E_BOUNDS
    assert c.latency.counts == (1.0,) * len(VLLM_E2E_BOUNDS) and c.latency.total == 1.0
    assert c.ttft.bounds == VLLM_TTFT_BOUNDS and c.ttft.total == 1.0
    # The one TTFT observation (0.313 s) sits in the (0.25, 0.5] bucket.
    assert c.ttft.counts[VLLM_TTFT_BOUNDS.index(0.25)] == 0.0
    assert c.ttft.counts[VLLM_TTFT_BOUNDS.index(0.5)] == 1.0
    assert (c.generated_tokens, c.prompt_tokens) == (7.0, 5.0)
    assert c.pods == 1


def test_every_name_of_the_vllm_map_is_in_the_real_scrape_or_the_http_sample():
    names = {s.name for s in an.parse_exposition(OPT125M) + an.parse_exposition(HTTP)}
    for name in (
        VLLM_MAP.requests.name,
        VLLM_MAP.errors.name,
        VLLM_MAP.fallback_requests.name,
        f"{VLLM_MAP.latency}_bucket",
        f"{VLLM_MAP.ttft}_bucket",
        VLLM_MAP.generated_tokens,
        VLLM_MAP.prompt_tokens,
    ):
        assert name in names, name


def test_builtin_map_reads_nothing_from_a_vllm_scrape():
    c = an.counters_from_text(OPT125M, BUILTIN_MAP)
    assert (c.requests, c.latency.total, c.ttft.total, c.generated_tokens) == (0, 0, 0, 0)


def test_vllm_requests_come_from_http_metrics_when_vllm_exports_them():
    c = an.counters_from_text(HTTP, VLLM_MAP)
    assert (c.requests, c.errors) == (201.0, 0.0)
    # Both sources in one scrape: the HTTP counter wins (it also counts requests refused
    # before the engine, which request_success never sees).
    both = an.counters_from_text(OPT125M + HTTP, VLLM_MAP)
    assert (both.requests, both.generated_tokens) == (201.0, 7.0)


@pytest.mark.parametrize(
    ("labels", "counted", "error"),
    [
        ({"handler": "/v1/completions", "method": "POST", "status": "2xx"}, True, False),
        ({"handler": "/v1/chat/completions", "method": "POST", "status": "5xx"}, True, True),
        ({"handler": "/v1/chat/completions", "method": "POST", "status": "503"}, True, True),
        ({"handler": "/v1/completions", "method": "POST", "status": "4xx"}, True, False),
        ({"handler": "/v1/models", "method": "GET", "status": "2xx"}, False, False),
        ({"handler": "/v1/models", "method": "GET", "status": "5xx"}, False, False),
        ({"handler": "/health", "method": "GET", "status": "5xx"}, False, False),
        ({"handler": "/metrics", "method": "GET", "status": "2xx"}, False, False),
    ],
)
def test_vllm_http_outcomes(labels, counted, error):
    assert VLLM_MAP.requests.matches("http_requests_total", labels) is counted
    assert VLLM_MAP.errors.matches("http_requests_total", labels) is error


@pytest.mark.parametrize(
    ("reason", "error"), [("stop", False), ("length", False), ("abort", False), ("error", True)]
)
def test_vllm_fallback_outcomes(reason, error):
    labels = {"engine": "0", "finished_reason": reason, "model_name": "m"}
    assert VLLM_MAP.fallback_requests.matches("vllm:request_success_total", labels)
    assert VLLM_MAP.fallback_errors.matches("vllm:request_success_total", labels) is error


def test_builtin_errors_are_5xx_codes():
    assert BUILTIN_MAP.errors.matches("kubetune_server_requests_total", {"code": "503"})
    assert not BUILTIN_MAP.errors.matches("kubetune_server_requests_total", {"code": "499"})
    assert not BUILTIN_MAP.errors.matches("kubetune_server_requests_total", {"code": "200"})


def test_an_interval_between_two_vllm_scrapes_is_judged():
    """Two scrapes of the same vLLM pod; the second is the real one, the first its start."""
    after = an.counters_from_text(OPT125M, VLLM_MAP)
    before = an.RevisionCounters(
        latency=an.Histogram(VLLM_E2E_BOUNDS, (0.0,) * len(VLLM_E2E_BOUNDS), 0.0),
        ttft=an.Histogram(VLLM_TTFT_BOUNDS, (0.0,) * len(VLLM_TTFT_BOUNDS), 0.0),
        pods=1,
    )
    iv = an.interval(before, after)
    assert iv is not None and iv.requests == 1 and iv.error_rate == 0.0
    # One request in the lowest bucket (0, 1.0]: p95 interpolates from 0, as histogram_quantile.
    assert math.isclose(iv.p95_latency_seconds, 0.95)
    assert 0.25 < iv.ttft_p95_seconds <= 0.5
    assert iv.as_status()["generatedTokens"] == 7.0
    # Judged against a stable that served the same: the default relative thresholds
    # (maxLatencyRatio, maxErrorRateIncrease) need stable figures to pass.
    verdict = an.evaluate(an.Measurement("t", iv, iv), AnalysisSpec(min_samples=1))
    assert verdict.phase == an.SUCCESSFUL, verdict.message
    # Counters survive status (analysisBaseline) unchanged.
    assert an.RevisionCounters.from_dict(after.to_dict()) == after


def test_counter_rule_selector_is_promql():
    rule = CounterRule("x_total", {"a": "b.*"}, {"c": "d"})
    assert rule.selector('ns="n"') == 'x_total{ns="n",a=~"b.*",c!="d"}'
    assert CounterRule("x_total").selector("") == "x_total{}"


def test_default_queries_per_engine():
    builtin = an.default_queries(BUILTIN_MAP)
    assert builtin == an.DEFAULT_QUERIES
    assert builtin["errorRate"].startswith(
        'sum(increase(kubetune_server_requests_total{namespace="{{namespace}}",'
        'revision="{{revision}}",code=~"5.."}[{{interval}}]))'
    )
    vllm = an.default_queries(VLLM_MAP)
    assert (
        'http_requests_total{namespace="{{namespace}}",revision="{{revision}}",' in vllm["requests"]
    )
    assert 'status=~"5.."' in vllm["errorRate"] and 'handler!="/v1/models"' in vllm["errorRate"]
    assert "vllm:e2e_request_latency_seconds_bucket{" in vllm["latencyP95"]
    assert "vllm:time_to_first_token_seconds_bucket{" in vllm["ttftP95"]


def test_metric_map_lookup():
    assert metric_map(None) is BUILTIN_MAP and metric_map("vllm") is VLLM_MAP
    with pytest.raises(ValueError, match="unknown serving engine 'tgi'"):
        metric_map("tgi")
