"""Every shipped manifest is accepted and every malformed one is refused, naming the field.

Covers:
- each file in ``examples/`` (recursively) passes ``kubetune validate`` (schema, defaults, CEL);
  the built-in objects beside them (Secret, ServiceAccount) pass kubernetes-validate;
- each file in ``tests/schema/invalid/`` is refused by the real ``kubetune validate`` command
  (exit status 1), and its error text contains every ``# expect:`` fragment of the file (the
  field path such as ``spec.method.lora.r``, plus the reason), with ``file:line``;
- transition rules: baseModel and dataset are immutable on update;
- the committed docs/api-reference.md has not drifted from the models (``kubetune docs --check``).
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kubetune.api.validation import validate_manifest
from kubetune.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
INVALID = Path(__file__).parent / "invalid"
KUBE_VERSION = "1.30"

EXAMPLE_FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yaml", ".yml"))
INVALID_FILES = sorted(INVALID.glob("*.yaml"))


def _expectations(path: Path) -> list[str]:
    return re.findall(r"^# expect: (.+)$", path.read_text(), flags=re.M)


def test_there_are_enough_cases() -> None:
    assert len(INVALID_FILES) >= 25
    assert {p.name for p in EXAMPLE_FILES} >= {
        "finetunejob-lora.yaml",
        "finetunejob-qlora.yaml",
        "modeldeployment-canary.yaml",
        "modeldeployment-replicas.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_is_accepted(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(path)]) == 0, capsys.readouterr().err
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        group = str(doc["apiVersion"]).split("/")[0]
        if "." not in group or group.endswith(".k8s.io"):  # a built-in kind
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_examples_folder_is_accepted_as_a_whole(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-f", str(EXAMPLES)]) == 0
    out = capsys.readouterr().out
    checked = int(out.split()[0])
    assert checked >= 5, out


@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.stem)
def test_malformed_manifest_is_refused_naming_the_field(
    path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _expectations(path)
    assert expected, f"{path.name} has no '# expect:' line"
    assert main(["validate", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    field = expected[0]
    # The first expectation is the field path; the error line starts with file:line and names it.
    assert re.search(
        rf"^{re.escape(str(path))}:\d+ \(document 0\): {re.escape(field)}(: |\.)", err, re.M
    ), err
    for fragment in expected[1:]:
        assert fragment in err, f"{fragment!r} not in:\n{err}"


def _ftj(**spec_overrides: object) -> dict:
    spec = {
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/x"},
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("baseModel", {"uri": "s3://models/other"}, "baseModel is immutable"),
        ("dataset", {"train": "s3://data/other.jsonl"}, "dataset is immutable"),
    ],
)
def test_immutable_fields_are_refused_on_update(field: str, value: dict, message: str) -> None:
    old = _ftj()
    errors = validate_manifest(_ftj(**{field: value}), old=old)
    assert [e.path for e in errors] == [f"spec.{field}"]
    assert message in errors[0].message
    # The same change on create is fine, and a mutable field may change on update.
    assert validate_manifest(_ftj(**{field: value})) == []
    assert validate_manifest(_ftj(hyperparameters={"epochs": 2}), old=old) == []


def test_api_reference_has_not_drifted(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["docs", "--check"]) == 0, capsys.readouterr().err
