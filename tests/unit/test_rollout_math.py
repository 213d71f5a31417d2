"""Pure rollout arithmetic: weights, metric parsing and intervals, revision hashes.

Aspects covered: traffic mode resolution; canary pod counts for exact and replica-proportional
routers; the weight a router really achieves (no ready pods -> 0) and the warning; the
Prometheus text parser (labels with escapes, +Inf, a malformed line named by number);
summing pods; interval deltas and a counter reset discarded; histogram_quantile semantics;
durations; the revision hash (stable, ignores replicas and rollout settings, changes with the
adapter digest) and model resolution from a FineTuneJob (merged weights when asked).
"""

from __future__ import annotations

import math

import pytest

from kubetune.api.modeldeployment import ModelDeploymentSpec
from kubetune.rollout import analysis as an
from kubetune.rollout import weights as wt
from kubetune.rollout.revisions import ModelProblem, Revision, resolve


@pytest.mark.parametrize(
    ("requested", "gateway", "parents", "mode"),
    [
        ("auto", True, True, "gatewayAPI"),
        ("auto", True, False, "replicas"),
        ("auto", False, True, "replicas"),
        ("gatewayAPI", False, True, "gatewayAPI"),
        ("replicas", True, True, "replicas"),
    ],
)
def test_resolve_mode(requested, gateway, parents, mode):
    assert wt.resolve_mode(requested, gateway, parents) == mode


@pytest.mark.parametrize(
    ("mode", "replicas", "weight", "pods"),
    [
        ("gatewayAPI", 20, 10, 2),
        ("gatewayAPI", 1, 10, 1),
        ("gatewayAPI", 4, 50, 2),
        ("gatewayAPI", 4, 0, 1),
        ("gatewayAPI", 4, 100, 4),
        ("replicas", 9, 10, 1),
        ("replicas", 1, 10, 1),
        ("replicas", 3, 50, 3),
        ("replicas", 3, 80, 3),  # never more than stable
        ("local", 10, 30, 3),
    ],
)
def test_canary_replicas(mode, replicas, weight, pods):
    assert wt.canary_replicas(mode, replicas, weight) == pods


@pytest.mark.parametrize(
    ("mode", "configured", "ready", "achieved"),
    [
        ("gatewayAPI", {"s": 90, "c": 10}, {"s": 3, "c": 1}, 10),
        ("gatewayAPI", {"s": 90, "c": 10}, {"s": 3, "c": 0}, 0),
        ("gatewayAPI", {"s": 1, "c": 3}, {"s": 1, "c": 1}, 75),
        ("replicas", {"s": 90, "c": 10}, {"s": 1, "c": 1}, 50),
        ("replicas", {"s": 90, "c": 10}, {"s": 9, "c": 1}, 10),
        ("replicas", {"s": 100, "c": 0}, {"s": 9, "c": 1}, 0),
    ],
)
def test_achieved_weight(mode, configured, ready, achieved):
    assert wt.achieved_canary_weight(mode, configured, "c", ready) == achieved


def test_weight_warning_and_traffic_weights():
    assert wt.weight_warning(10, 12) is None
    assert "not the 10%" in wt.weight_warning(10, 50)
    assert wt.traffic_weights("s", "c", 30) == {"s": 70, "c": 30}
    assert wt.traffic_weights("s", None, 30) == {"s": 100}
    assert wt.traffic_weights(None, "c", 30) == {"c": 100}


TEXT = """# HELP kubetune_server_requests_total Requests.
# TYPE kubetune_server_requests_total counter
kubetune_server_requests_total{model="a \\"quoted\\" name",code="200"} 90
kubetune_server_requests_total{model="b",code="500"} 10 1700000000000
kubetune_server_request_duration_seconds_bucket{model="a",le="0.1"} 50
kubetune_server_request_duration_seconds_bucket{model="a",le="1.0"} 90
kubetune_server_request_duration_seconds_bucket{model="a",le="+Inf"} 100
"""


def test_parse_exposition_and_counters():
    samples = an.parse_exposition(TEXT)
    assert samples[0].labels["model"] == 'a "quoted" name'
    c = an.counters_from_text(TEXT)
    assert (c.requests, c.errors) == (100, 10)
    assert c.latency.bounds == (0.1, 1.0) and c.latency.total == 100
    with pytest.raises(ValueError, match="line 2"):
        an.parse_exposition("ok 1\nnot a sample {\n")


EDGES = """# TYPE tgi_request_count counter
tgi_request_count 7
kubetune_server_requests_total{model="a\\\\b\\nc",code="200"} 3 1700000000000
kubetune_server_requests_created{model="a"} 1.7e9
g{x="y"} NaN
  h{le="+Inf"}\t-Inf
"""


def test_parse_exposition_edge_cases_read_like_the_hand_parser_did():
    samples = an.parse_exposition(EDGES)
    # Names as written: a counter typed without _total is not renamed; _created is a sample.
    assert [s.name for s in samples] == [
        "tgi_request_count",
        "kubetune_server_requests_total",
        "kubetune_server_requests_created",
        "g",
        "h",
    ]
    assert samples[1].labels["model"] == "a\\b\nc" and samples[1].value == 3.0
    assert math.isnan(samples[3].value) and samples[4].value == -math.inf
    assert samples[4].labels == {"le": "+Inf"} and all(type(s.value) is float for s in samples)
    for bad, line in [("a 1\nb{l=x} 2", 2), ('a 1\n\nb{l="x} 1', 3), ("a abc", 1), ("a", 1)]:
        with pytest.raises(ValueError, match=f"line {line}: not a Prometheus sample"):
            an.parse_exposition(bad)


def test_interval_and_reset():
    before = an.counters_from_text(TEXT)
    after = an.sum_counters([before, before])
    iv = an.interval(before, after)
    assert iv is not None and iv.requests == 100 and iv.error_rate == 0.1
    assert an.interval(after, before) is None  # a pod restarted: discard


@pytest.mark.parametrize(
    ("q", "expected"),
    [(0.5, 0.1), (0.95, 1.0), (0.7, 0.1 + 0.9 * (70 - 50) / 40)],
)
def test_histogram_quantile(q, expected):
    hist = an.Histogram((0.1, 1.0), (50.0, 90.0), 100.0)
    assert math.isclose(hist.quantile(q), expected)
    assert an.Histogram().quantile(0.95) is None


@pytest.mark.parametrize(
    ("text", "seconds"), [("10s", 10), ("1m30s", 90), ("250ms", 0.25), ("2h", 7200)]
)
def test_parse_duration(text, seconds):
    assert an.parse_duration(text) == seconds
    with pytest.raises(ValueError, match="bad duration"):
        an.parse_duration("10 s")


SPEC = {
    "model": {
        "baseModel": {"uri": "s3://models/base"},
        "adapter": {"uri": "s3://models/ad", "revision": "v1"},
    }
}


def spec(**over) -> ModelDeploymentSpec:
    return ModelDeploymentSpec.model_validate({**SPEC, **over})


def test_revision_hash_is_stable_and_ignores_scaling_and_strategy():
    a = resolve(spec(), "chat")
    assert isinstance(a, Revision) and len(a.name) == 10
    assert resolve(spec(), "chat") == a
    assert resolve(spec(replicas=7, rollout={"progressDeadlineSeconds": 60}), "chat").name == a.name
    assert resolve(spec(server={"maxBatchSize": 4}), "chat").name != a.name
    other = {"model": {**SPEC["model"], "adapter": {"uri": "s3://models/ad", "revision": "v2"}}}
    assert resolve(ModelDeploymentSpec.model_validate(other), "chat").name != a.name


def test_resolve_from_finetunejob():
    s = ModelDeploymentSpec.model_validate(
        {"model": {"fineTuneJobRef": {"name": "ft"}}, "server": {"mergeAdapter": True}}
    )
    assert isinstance(resolve(s, "chat", None), ModelProblem)
    failed = resolve(s, "chat", {"status": {"phase": "Failed", "message": "OOM"}})
    assert isinstance(failed, ModelProblem) and failed.terminal and "OOM" in failed.message
    ftj = {
        "spec": {"baseModel": {"uri": "s3://models/base"}},
        "status": {
            "phase": "Succeeded",
            "artifact": {
                "uri": "s3://out/model",
                "mergedUri": "s3://out/merged",
                "digest": "sha256:1",
            },
        },
    }
    rev = resolve(s, "chat", ftj)
    assert (
        isinstance(rev, Revision) and rev.model_uri == "s3://out/merged" and rev.adapter_uri is None
    )
    assert rev.fine_tune_job == "ft" and rev.adapter_digest == "sha256:1"
