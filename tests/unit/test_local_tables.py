"""``kubetune local status`` tables have the columns of ``kubectl get`` (the CRDs' printer columns).

Covers: the columns come from the generated CRDs (priority-1 columns only with wide); values are
read by the columns' JSONPaths, missing ones left blank; ages are printed the way kubectl does.
"""

from __future__ import annotations

from datetime import UTC, datetime

from kubetune.local.tables import age, printer_columns, table


def test_columns_are_the_crds_printer_columns():
    names = [c["name"] for c in printer_columns("ModelDeployment")]
    assert names[:5] == ["Phase", "Replicas", "Stable", "Canary", "Weight"]


def test_table_reads_json_paths_and_hides_priority_columns_unless_wide():
    obj = {
        "metadata": {"name": "assistant", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "status": {
            "phase": "Progressing",
            "stable": {"name": "abc"},
            "canary": {"name": "def"},
            "weights": {"canary": 20},
        },
    }
    lines = table("ModelDeployment", [obj]).splitlines()
    assert lines[0].split()[:6] == ["NAME", "PHASE", "REPLICAS", "STABLE", "CANARY", "WEIGHT"]
    assert lines[1].split()[:5] == ["assistant", "Progressing", "abc", "def", "20"]
    ftj = {"metadata": {"name": "j"}, "status": {"phase": "Running", "restarts": 2}}
    assert "RESTARTS" not in table("FineTuneJob", [ftj])
    wide = table("FineTuneJob", [ftj], wide=True).splitlines()
    assert "RESTARTS" in wide[0] and wide[1].split() == ["j", "Running", "2"]


def test_age_like_kubectl():
    now = datetime(2026, 1, 2, 0, 0, 0, tzinfo=UTC)
    assert age("2026-01-01T23:59:15Z", now) == "45s"
    assert age("2026-01-01T23:56:48Z", now) == "3m12s"
    assert age("2026-01-01T19:00:00Z", now) == "5h"
    assert age("2025-12-29T00:00:00Z", now) == "4d"
    assert age(None, now) == "<unknown>"
