"""The operator's /metrics: names, per-phase gauges as exact counts, reconcile/error counters.

Covers: every phase exported at 0 before any object; set_phase moving an object between phases
(gauges are counts, not increments); forget; reconcile() counting ok and error (the exception
still propagates); rollbacks also counted as RolledBack rollouts; the HTTP endpoint serving the
registry in the Prometheus text format.
"""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubetune import metrics


def _value(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_every_phase_is_exported_and_counts_objects_exactly() -> None:
    for phase in metrics.FTJ_PHASES:
        assert (
            metrics.REGISTRY.get_sample_value("kubetune_finetunejobs", {"phase": phase}) is not None
        )
    before = _value("kubetune_finetunejobs", phase="Running")
    metrics.set_phase("FineTuneJob", "ns-metrics", "a", "Validating")
    metrics.set_phase("FineTuneJob", "ns-metrics", "a", "Running")
    metrics.set_phase(
        "FineTuneJob", "ns-metrics", "a", "Running"
    )  # level-triggered: no double count
    assert _value("kubetune_finetunejobs", phase="Running") == before + 1
    metrics.forget("FineTuneJob", "ns-metrics", "a")
    assert _value("kubetune_finetunejobs", phase="Running") == before


def test_reconcile_counts_ok_and_errors_and_reraises() -> None:
    ok = _value("kubetune_operator_reconciles_total", kind="ModelDeployment", result="ok")
    err = _value(
        "kubetune_operator_reconcile_errors_total", kind="ModelDeployment", error="KeyError"
    )
    with metrics.reconcile("ModelDeployment"):
        pass
    with pytest.raises(KeyError), metrics.reconcile("ModelDeployment"):
        raise KeyError("x")
    assert (
        _value("kubetune_operator_reconciles_total", kind="ModelDeployment", result="ok") == ok + 1
    )
    assert (
        _value("kubetune_operator_reconcile_errors_total", kind="ModelDeployment", error="KeyError")
        == err + 1
    )


def test_rollback_counts_a_rolled_back_rollout() -> None:
    before = _value("kubetune_rollouts_total", result="RolledBack")
    metrics.record_rollback("AnalysisFailed")
    assert _value("kubetune_rollbacks_total", reason="AnalysisFailed") >= 1
    assert _value("kubetune_rollouts_total", result="RolledBack") == before + 1


def test_metrics_endpoint_serves_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")
    monkeypatch.setenv("KUBETUNE_METRICS_ADDR", "127.0.0.1")
    port = metrics.serve_from_env()
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as rsp:
        text = rsp.read().decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "kubetune_operator_reconciles",
        "kubetune_finetunejobs",
        "kubetune_modeldeployments",
        "kubetune_rollbacks",
    } <= names


def test_status_changes_become_counts_once() -> None:
    ns = "ns-status"
    restarts = _value("kubetune_finetunejob_restarts_total", reason="Preempted")
    metrics.observe_status("FineTuneJob", ns, "j", {"phase": "Running", "restarts": 0})
    metrics.observe_status(
        "FineTuneJob",
        ns,
        "j",
        {"phase": "Running", "restarts": 1, "lastFailureReason": "Preempted"},
    )
    metrics.observe_status(
        "FineTuneJob",
        ns,
        "j",
        {"phase": "Running", "restarts": 1, "lastFailureReason": "Preempted"},
    )
    assert _value("kubetune_finetunejob_restarts_total", reason="Preempted") == restarts + 1

    promoted = _value("kubetune_rollouts_total", result="Promoted")
    rollbacks = _value("kubetune_rollbacks_total", reason="EvalGateFailed")
    metrics.observe_status(
        "ModelDeployment", ns, "m", {"phase": "Healthy", "stable": {"name": "r1"}}
    )
    metrics.observe_status(
        "ModelDeployment",
        ns,
        "m",
        {"phase": "Progressing", "stable": {"name": "r1"}, "canary": {"name": "r2"}},
    )
    metrics.observe_status(
        "ModelDeployment", ns, "m", {"phase": "Healthy", "stable": {"name": "r2"}}
    )
    metrics.observe_status(
        "ModelDeployment", ns, "m", {"phase": "Healthy", "stable": {"name": "r2"}}
    )  # replay
    assert _value("kubetune_rollouts_total", result="Promoted") == promoted + 1
    metrics.observe_status(
        "ModelDeployment",
        ns,
        "m",
        {
            "phase": "RolledBack",
            "stable": {"name": "r2"},
            "rejectedRevisions": [{"name": "r3", "reason": "x"}],
            "conditions": [{"type": "Degraded", "status": "True", "reason": "EvalGateFailed"}],
        },
    )
    assert _value("kubetune_rollbacks_total", reason="EvalGateFailed") == rollbacks + 1
    assert _value("kubetune_modeldeployments", phase="RolledBack") >= 1
    metrics.forget_status("ModelDeployment", ns, "m")
    metrics.forget_status("FineTuneJob", ns, "j")


def test_first_status_after_a_restart_is_a_baseline() -> None:
    before = _value("kubetune_finetunejob_restarts_total", reason="OOMKilled")
    metrics.observe_status(
        "FineTuneJob",
        "ns-baseline",
        "j",
        {"phase": "Running", "restarts": 3, "lastFailureReason": "OOMKilled"},
    )
    assert _value("kubetune_finetunejob_restarts_total", reason="OOMKilled") == before
    metrics.forget_status("FineTuneJob", "ns-baseline", "j")
