"""Progress reports and the termination message (kubetune_trainer.reporting, errors, settings).

Covers: merge-patch semantics of the file channel (nested merge, null deletes); the background
reporter delivers the newest merged state and flushes on close; the termination message stays
within 4 KiB by shortening the message and dropping PII counts first, never outcome/step/artifact;
exceptions map to the outcomes and exit codes of docs/contracts.md; bad trainer environment is a
config error naming the variable.
"""

from __future__ import annotations

import json

import pytest

from kubetune.storage import StorageError
from kubetune_trainer.errors import ConfigError, DataError, Preempted, classify
from kubetune_trainer.reporting import (
    BackgroundReporter,
    FileChannel,
    make_reporter,
    merge_patch,
    termination_message,
)
from kubetune_trainer.settings import Settings


def test_merge_patch_merges_nested_and_deletes_on_null():
    assert merge_patch({"a": {"x": 1, "y": 2}, "b": 1}, {"a": {"y": 3}, "b": None}) == {
        "a": {"x": 1, "y": 3}
    }


def test_file_reporter_flushes_the_merged_state_on_close(tmp_path):
    path = tmp_path / "p.json"
    rep = make_reporter(path.as_uri(), "ns", "job", min_interval=60)
    rep.report({"progress": {"step": 1, "totalSteps": 10}})
    rep.report({"progress": {"step": 2}, "metrics": {"trainLoss": 1.5}})
    rep.close()
    assert json.loads(path.read_text()) == {
        "progress": {"step": 2, "totalSteps": 10},
        "metrics": {"trainLoss": 1.5},
    }


def test_urgent_reports_are_sent_without_waiting_and_state_accumulates(tmp_path):
    channel = FileChannel(tmp_path / "p.json")
    rep = BackgroundReporter(channel, min_interval=3600)
    rep.report({"checkpoints": [{"step": 5}]}, urgent=True)
    rep.report({"resumedFromStep": 5}, urgent=True)
    rep.close()
    assert channel.state == {"checkpoints": [{"step": 5}], "resumedFromStep": 5}


def test_unknown_report_channel_is_refused():
    with pytest.raises(ValueError, match="KUBETUNE_REPORT"):
        make_reporter("http://x", "ns", "job")


def test_termination_message_fits_4k_keeping_outcome_step_and_artifact():
    text = termination_message(
        "data_error",
        "x" * 10000,
        step=7,
        metrics={"evalLoss": 0.5, "evalAccuracy": None},
        data_report={"valid": 1, "piiMasked": {f"kind{i}": i for i in range(300)}},
        artifact={"uri": "s3://b/model", "digest": "sha256:ab"},
    )
    body = json.loads(text)
    assert len(text.encode()) <= 4096
    assert (
        body["outcome"] == "data_error"
        and body["step"] == 7
        and body["artifact"]["digest"] == "sha256:ab"
    )
    assert body["metrics"] == {"evalLoss": 0.5} and body["message"].startswith("xxx")


@pytest.mark.parametrize(
    ("exc", "outcome", "code"),
    [
        (DataError("bad"), "data_error", 2),
        (ConfigError("bad"), "config_error", 2),
        (StorageError("s3 down"), "storage_error", 3),
        (Preempted("term"), "preempted", 143),
        (MemoryError(), "oom", 1),
        (RuntimeError("boom"), "other", 1),
    ],
)
def test_exceptions_map_to_contract_outcomes(exc, outcome, code):
    got = classify(exc)
    assert got[:2] == (outcome, code) and got[2]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "KUBETUNE_SPEC is not set"),
        ({"KUBETUNE_SPEC": "{"}, "not valid JSON"),
        ({"KUBETUNE_SPEC": json.dumps({"dataset": {}})}, "baseModel"),
        (
            {
                "KUBETUNE_SPEC": json.dumps(
                    {
                        "baseModel": {"uri": "file:///m"},
                        "dataset": {"train": "file:///t"},
                        "output": {"uri": "file:///o"},
                    }
                ),
                "WORLD_SIZE": "2",
                "RANK": "5",
            },
            "inconsistent torchrun",
        ),
    ],
)
def test_bad_environment_is_a_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_environ(env)
