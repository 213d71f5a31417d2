"""API models: defaults, camelCase wire form, unknown-field rejection, CRD generation basics."""

import pydantic
import pytest

from kubetune.api import FineTuneJob
from kubetune.api.conditions import set_condition
from kubetune.api.crds import all_crds


def _ftj(**spec):
    base = {
        "baseModel": {"uri": "s3://models/base"},
        "dataset": {"train": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/run1"},
    }
    base.update(spec)
    return {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "a"}, "spec": base}


def test_defaults_fill_in_and_wire_form_is_camel_case():
    obj = FineTuneJob.model_validate(_ftj())
    wire = obj.spec.dump()
    assert wire["hyperparameters"]["learningRate"] == 2e-4
    assert wire["method"]["type"] == "lora"
    assert wire["checkpoint"]["keepLast"] == 2


def test_unknown_field_is_rejected_with_its_path():
    with pytest.raises(pydantic.ValidationError) as err:
        FineTuneJob.model_validate(_ftj(hyperparameters={"learningrate": 1e-4}))
    assert "hyperparameters.learningrate" in str(err.value).replace("\n", ".").replace(" ", "")


def test_set_condition_keeps_transition_time_when_status_does_not_flip():
    conds = set_condition([], "Ready", True, "A", "m", now="t1")
    conds = set_condition(conds, "Ready", True, "B", "m2", now="t2")
    assert conds[0]["lastTransitionTime"] == "t1" and conds[0]["reason"] == "B"
    conds = set_condition(conds, "Ready", False, "C", "m3", now="t3")
    assert conds[0]["lastTransitionTime"] == "t3"


@pytest.mark.parametrize("name", sorted(all_crds()))
def test_crd_schema_is_structural(name):
    """No $ref, anyOf or additionalProperties:false survive: the API server would refuse them."""
    text = str(all_crds()[name])
    assert "$ref" not in text and "anyOf" not in text and "'additionalProperties': False" not in text


@pytest.mark.parametrize(
    ("method", "strategy", "resolved"),
    [
        ("full", "auto", "fsdp"),
        ("lora", "auto", "ddp"),
        ("qlora", "auto", "ddp"),
        ("lora", "fsdp", "fsdp"),
        ("full", "ddp", "ddp"),
    ],
)
def test_distributed_strategy_auto_follows_the_method_only(method, strategy, resolved):
    from kubetune.api.finetunejob import resolve_strategy

    # nodes and gpus never enter: a job resized between attempts keeps its checkpoint layout.
    for nodes, gpus in ((1, 0), (4, 8)):
        spec = FineTuneJob.model_validate(
            _ftj(method={"type": method}, distributed={"strategy": strategy}, nodes=nodes, resources={"gpus": gpus})
        ).spec
        assert resolve_strategy(spec) == resolved


def test_gradient_checkpointing_defaults_to_unset_meaning_auto():
    spec = FineTuneJob.model_validate(_ftj()).spec
    assert spec.hyperparameters.gradient_checkpointing is None
    assert spec.distributed.strategy == "auto"
