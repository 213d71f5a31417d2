"""``python -m kubetune_trainer validate`` as the validate Job runs it (a subprocess).

Covers: a malformed dataset exits 2 with a termination message naming file:line and a report
listing every bad line (and `train` does not take that failed report for a validation); a good
dataset yields cleaned train/validation splits (PII masked, duplicates dropped, disjoint), the
report written with token statistics, and the dataReport summary in the termination message;
too few examples and a missing file fail with what to fix; the whole flow against S3 (moto);
the memory pre-flight from the base model's config.json: the estimate in the termination message
and the report, and a spec that does not fit its GPU fails (exit 2) with the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

from kubetune_trainer import synthetic
from kubetune_trainer.data import normalised_key
from tests.integration.trainer_helpers import make_spec, run, run_here, trainer_env


def test_malformed_lines_exit_2_naming_file_and_line(tmp_path, tiny_base_model_uri):
    path = synthetic.write_task_dataset(tmp_path / "train.jsonl", 40)
    lines = path.read_text().splitlines()
    lines[6] = '{"messages": [{"role": "user", "content": "no answer"}]'  # broken JSON
    lines[11] = '{"prompt": "wrong format", "completion": "x"}'
    lines[30] = '{"messages": [{"role": "user", "content": "q"}]}'
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    spec = make_spec(
        tiny_base_model_uri,
        path.as_uri(),
        out.as_uri(),
        dataset={"train": path.as_uri(), "format": "chat"},
    )
    code, msg, _ = run("validate", trainer_env(spec, tmp_path))
    assert code == 2 and msg["outcome"] == "data_error"
    for line in (7, 12, 31):
        assert f"{path.as_uri()}:{line}: " in msg["message"]
    assert "dataset.maxInvalidFraction" in msg["message"]
    assert msg["dataReport"]["invalid"] == 3 and msg["dataReport"]["totalLines"] == 40
    report = json.loads((out / "data/report.json").read_text())
    assert report["outcome"] == "data_error"
    assert [e["line"] for e in report["files"][0]["errors"]] == [7, 12, 31]
    assert not (out / "data/train.jsonl").exists()


def test_clean_split_with_pii_dedupe_and_report(tmp_path, tiny_base_model_uri, monkeypatch):
    path = synthetic.write_task_dataset(tmp_path / "train.jsonl", 120)
    lines = path.read_text().splitlines()
    pii = {
        "messages": [
            {"role": "user", "content": "Mail bob@corp.example or call +44 20 7946 0958"},
            {"role": "assistant", "content": "From 192.168.1.20, card 4111 1111 1111 1111"},
        ]
    }
    shouted = json.loads(lines[1])
    for m in shouted["messages"]:
        m["content"] = "  " + m["content"].upper()
    lines += [json.dumps(pii), lines[0], json.dumps(shouted), "{oops"]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    spec = make_spec(
        tiny_base_model_uri,
        path.as_uri(),
        out.as_uri(),
        dataset={
            "train": path.as_uri(),
            "validationSplit": 0.2,
            "maxSeqLength": 24,
            "piiMasking": {"kinds": ["email", "phone", "ipAddress", "creditCard"]},
        },
    )
    code, msg = run_here("validate", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 0
    s = msg["dataReport"]
    assert msg["outcome"] == "succeeded" and s["format"] == "chat"
    assert s["invalid"] == 1 and s["duplicates"] == 2
    assert s["piiMasked"] == {"email": 1, "phone": 1, "ipAddress": 1, "creditCard": 1}
    assert s["trainExamples"] + s["validationExamples"] == 121 and s["validationExamples"] >= 10
    assert s["truncated"] > 0  # the chat template makes most examples longer than 24 tokens
    train = [json.loads(x) for x in (out / "data/train.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (out / "data/validation.jsonl").read_text().splitlines()]
    assert not {normalised_key(r) for r in train} & {normalised_key(r) for r in val}
    text = (out / "data/train.jsonl").read_text() + (out / "data/validation.jsonl").read_text()
    assert "bob@corp" not in text and "[EMAIL]" in text and "[CREDIT_CARD]" in text
    report = json.loads((out / "data/report.json").read_text())
    assert report["tokens"]["lengths"]["max"] > 24 and report["summary"] == s
    # Re-running gives the same split (content-hash split, no randomness).
    code, again = run_here("validate", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 0 and again["dataReport"]["digest"] == s["digest"]


def test_too_few_examples_and_missing_file_say_what_to_fix(
    tmp_path, tiny_base_model_uri, monkeypatch
):
    path = synthetic.write_task_dataset(tmp_path / "train.jsonl", 8)
    spec = make_spec(tiny_base_model_uri, path.as_uri(), (tmp_path / "out").as_uri())
    code, msg = run_here("validate", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 2 and "dataset.minExamples" in msg["message"]
    missing = make_spec(
        tiny_base_model_uri, (tmp_path / "nope.jsonl").as_uri(), (tmp_path / "out").as_uri()
    )
    code, msg = run_here("validate", trainer_env(missing, tmp_path), monkeypatch)
    assert code == 3 and msg["outcome"] == "storage_error" and "nope.jsonl" in msg["message"]


def test_validate_reads_and_writes_s3(tmp_path, tiny_base_model: Path, s3_env, s3_uri, monkeypatch):
    from kubetune.storage import open_store

    store = open_store(s3_uri)
    store.upload_dir(tiny_base_model, "base")
    synthetic.write_task_dataset(tmp_path / "train.jsonl", 60, format="completion")
    store.upload_file(tmp_path / "train.jsonl", "in/train.jsonl")
    spec = make_spec(f"{s3_uri}/base", f"{s3_uri}/in/train.jsonl", f"{s3_uri}/out")
    code, msg = run_here("validate", trainer_env(spec, tmp_path, s3_env), monkeypatch)
    assert code == 0
    assert msg["dataReport"]["format"] == "completion"
    assert msg["dataReport"]["reportUri"] == f"{s3_uri}/out/data/report.json"
    assert (
        store.read_json("out/data/report.json")["summary"]["trainExamples"]
        == msg["dataReport"]["trainExamples"]
    )


def test_chat_data_on_a_base_model_without_chat_template_is_a_config_error(
    tmp_path, tiny_base_model, monkeypatch
):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base_model, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    path = synthetic.write_task_dataset(tmp_path / "train.jsonl", 30)
    spec = make_spec(base.as_uri(), path.as_uri(), (tmp_path / "out").as_uri())
    code, msg = run_here("validate", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 2 and msg["outcome"] == "config_error"
    assert "needs a chat template" in msg["message"] and "completion" in msg["message"]


def test_given_validation_file_removes_leaked_training_examples(
    tmp_path, tiny_base_model_uri, monkeypatch
):
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 40, seed=1)
    val = synthetic.write_task_dataset(tmp_path / "val.jsonl", 10, seed=2)
    leaked = train.read_text().splitlines()[:3]
    val.write_text(val.read_text() + "\n".join(leaked) + "\n")
    out = tmp_path / "out"
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        out.as_uri(),
        dataset={"train": train.as_uri(), "validation": val.as_uri()},
    )
    code, msg = run_here("validate", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 0
    report = json.loads((out / "data/report.json").read_text())
    assert report["leakedFromTrain"] == 3 and report["splitBy"] == "file"
    assert (
        msg["dataReport"]["trainExamples"] == 37 and msg["dataReport"]["validationExamples"] == 13
    )
    assert [f["uri"] for f in report["files"]] == [train.as_uri(), val.as_uri()]


def test_a_max_seq_length_that_cuts_off_every_answer_fails(
    tmp_path, tiny_base_model_uri, monkeypatch
):
    train = synthetic.write_task_dataset(tmp_path / "train.jsonl", 30)
    spec = make_spec(
        tiny_base_model_uri,
        train.as_uri(),
        (tmp_path / "out").as_uri(),
        dataset={"train": train.as_uri(), "maxSeqLength": 16},
    )
    code, msg = run_here("validate", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 2 and "raise dataset.maxSeqLength" in msg["message"]


def test_memory_estimate_is_reported_from_the_base_models_config(tmp_path, tiny_base_model_uri, monkeypatch):
    path = synthetic.write_task_dataset(tmp_path / "train.jsonl", 40)
    out = tmp_path / "out"
    spec = make_spec(tiny_base_model_uri, path.as_uri(), out.as_uri())
    code, msg = run_here("validate", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 0
    est = msg["memoryEstimate"]
    config = json.loads((Path(tiny_base_model_uri.removeprefix("file://")) / "config.json").read_text())
    from kubetune.finetune.memory import shape_from_config

    assert est["parameters"] == shape_from_config(config).parameters()
    assert "fits" not in est and "no GPU" in est["message"]  # gpus: 0, no verdict
    assert json.loads((out / "data/report.json").read_text())["memory"] == est


def test_a_spec_that_does_not_fit_its_gpu_fails_validation_with_the_numbers(tmp_path, tiny_base_model_uri, monkeypatch):
    path = synthetic.write_task_dataset(tmp_path / "train.jsonl", 40)
    out = tmp_path / "out"
    spec = make_spec(
        tiny_base_model_uri,
        path.as_uri(),
        out.as_uri(),
        method={"type": "full"},
        resources={"gpus": 1, "gpuMemory": "2Gi"},  # validation itself runs on CPU
        dataset={"train": path.as_uri(), "maxSeqLength": 4096},
        hyperparameters={"batchSize": 64},
    )
    code, msg = run_here("validate", trainer_env(spec, tmp_path), monkeypatch)
    assert code == 2 and msg["outcome"] == "config_error"
    est = msg["memoryEstimate"]
    assert est["fits"] is False and est["gpuMemoryGib"] == 2.0
    assert msg["message"].startswith(f"needs ~{est['perGpuGib']} GiB per GPU, have 2.0 (resources.gpuMemory")
    assert "hyperparameters.batchSize" in msg["message"]  # what to change
    assert msg["dataReport"]["trainExamples"] > 0  # the data report still comes back
