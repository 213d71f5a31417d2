"""Issue 11, names and labels: a parent the CRDs accept never has a child the API server refuses.

Children are named after ``metadata.name`` and user input ends up in label values, and the API
server checks names and labels of the children that kubernetes-validate's OpenAPI schemas do
not: a FineTuneJob of 60 characters used to be accepted while its Job ``<name>-validate`` (whose
name becomes its pods' ``job-name`` label, at most 63) was refused.

Covers:
- the CRDs (and ``kubetune validate``, which runs the same CEL rules) refuse a name one
  character over each kind's limit and accept one at the limit, naming ``metadata.name``;
- with the longest accepted name (and the largest node count, a 63-character queue name),
  every child the builders make passes the API server's own name and label checks, written
  out below from apimachinery (not imported from the product, so they check it);
- the rules are written once but evaluated three ways (API server, ``kubetune validate``, the
  pydantic models of the local runtime): the offline two agree on every case here;
- every spec field that ends up in a label value or names another object is validated as one.
"""

from __future__ import annotations

import re
from typing import Any

import kubernetes_validate
import pytest
from pydantic import ValidationError

from kubetune.api import finetunejob as ftj_api
from kubetune.api import modeldeployment as mdep_api
from kubetune.api.crds import all_crds
from kubetune.api.validation import validate_manifest
from kubetune.finetune import builders as ftb
from kubetune.rollout import builders as mdb
from kubetune.rollout.revisions import Revision

KUBE_VERSION = "1.30"

# --- the API server's checks (k8s.io/apimachinery/pkg/util/validation) -------------------------

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")


def is_dns1123_label(s: str) -> bool:
    return len(s) <= 63 and bool(_DNS1123_LABEL.fullmatch(s))


def is_dns1035_label(s: str) -> bool:
    return len(s) <= 63 and bool(_DNS1035_LABEL.fullmatch(s))


def is_dns1123_subdomain(s: str) -> bool:
    return len(s) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(s))


def is_label_value(s: str) -> bool:
    return len(s) <= 63 and bool(_LABEL_VALUE.fullmatch(s))


def is_label_key(s: str) -> bool:
    prefix, _, name = s.rpartition("/")
    if "/" in s and not (prefix and is_dns1123_subdomain(prefix)):
        return False
    return len(name) <= 63 and bool(_QUALIFIED_NAME.fullmatch(name))


# How the API server validates each kind's metadata.name (pkg/apis/*/validation).
NAME_CHECKS = {
    "Job": is_dns1123_subdomain,
    "Service": is_dns1035_label,
    "ServiceAccount": is_dns1123_subdomain,
    "Role": lambda s: bool(s) and s not in (".", "..") and "/" not in s and "%" not in s,
    "RoleBinding": lambda s: bool(s) and s not in (".", "..") and "/" not in s and "%" not in s,
    "Deployment": is_dns1123_subdomain,
    "PodDisruptionBudget": is_dns1123_subdomain,
    "HTTPRoute": is_dns1123_subdomain,
}


def _labels_problems(labels: dict[str, str] | None, where: str) -> list[str]:
    out = []
    for key, value in (labels or {}).items():
        if not is_label_key(key):
            out.append(f"{where}: label key {key!r} is invalid")
        if not is_label_value(value):
            out.append(f"{where}: label {key}={value!r} is not a valid label value")
    return out


def child_problems(obj: dict[str, Any]) -> list[str]:
    """Every name or label of ``obj`` the API server (or a controller acting on it) refuses."""
    kind, meta = obj["kind"], obj["metadata"]
    name = meta["name"]
    where = f"{kind} {name}"
    problems = []
    if not NAME_CHECKS[kind](name):
        problems.append(f"{where}: not a valid {kind} name")
    problems += _labels_problems(meta.get("labels"), f"{where} metadata")
    spec = obj.get("spec") or {}
    selector = spec.get("selector")
    if isinstance(selector, dict):
        problems += _labels_problems(selector.get("matchLabels", selector), f"{where} selector")
    if kind == "Job":
        # The Job controller labels its pods job-name=<job> (and batch.kubernetes.io/job-name).
        problems += _labels_problems({"job-name": name}, f"{where} pods")
        if spec.get("completionMode") == "Indexed":
            # ValidateJob: the largest pod hostname <job>-<completions-1> must be a DNS label.
            hostname = f"{name}-{spec['completions'] - 1}"
            if not is_dns1123_label(hostname):
                problems.append(f"{where}: pod hostname {hostname!r} is not a DNS-1123 label")
    template = spec.get("template")
    if template:
        problems += _labels_problems(template["metadata"].get("labels"), f"{where} pod template")
        pod = template["spec"]
        problems += _labels_problems(pod.get("nodeSelector"), f"{where} nodeSelector")
        for field in ("subdomain", "hostname"):
            if field in pod and not is_dns1123_label(pod[field]):
                problems.append(f"{where}: pod {field} {pod[field]!r} is not a DNS-1123 label")
        for field in ("serviceAccountName", "priorityClassName"):
            if field in pod and not is_dns1123_subdomain(pod[field]):
                problems.append(f"{where}: pod {field} {pod[field]!r} is not a DNS-1123 subdomain")
    return problems


# --- the objects -------------------------------------------------------------------------------


def make_ftj(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid-1"},
        "spec": {
            "baseModel": {"uri": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl"},
            "output": {"uri": "s3://out/x"},
            **spec,
        },
    }


def make_mdep(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": "team-a", "uid": "uid-2"},
        "spec": {"model": {"fineTuneJobRef": {"name": "ftj"}}, **spec},
    }


def ftj_children(ftj: dict[str, Any]) -> list[dict[str, Any]]:
    objs = [ftb.build_validate_job(ftj), ftb.build_train_job(ftj, attempt=99)]
    objs += ftb.build_trainer_rbac(ftj)
    if ftj["spec"].get("nodes", 1) > 1:
        objs.append(ftb.build_train_service(ftj))
    return objs


def mdep_children(md: dict[str, Any]) -> list[dict[str, Any]]:
    rev = Revision(
        name="f" * 10,
        model_uri="s3://models/base",
        adapter_uri="s3://models/adapter",
        adapter_digest="sha256:ff",
        fine_tune_job="ftj",
        model_name=md["metadata"]["name"],
        image="ghcr.io/kubetune/server:0.1.0",
    )
    assert len(rev.name) == mdep_api.REVISION_HASH_LENGTH
    return [
        mdb.build_server_deployment(md, rev, role=mdb.ROLE_STABLE),
        mdb.build_server_deployment(md, rev, role=mdb.ROLE_CANARY, replicas=1),
        mdb.build_revision_service(md, rev.name),
        mdb.build_stable_service(md),
        mdb.build_pdb(md, rev.name),
        mdb.build_httproute(md, {rev.name: 90, "0" * 10: 10}),
    ]


def name_of_length(n: int, prefix: str = "support-bot-lora") -> str:
    """A valid object name (a DNS-1035 label when ``n`` <= 63) of exactly ``n`` characters."""
    name = (prefix + "-" + "x" * n)[:n]
    assert len(name) == n and is_dns1123_subdomain(name), name
    assert n > 63 or is_dns1035_label(name), name
    return name


def name_errors(obj: dict[str, Any]) -> list[str]:
    return [str(e) for e in validate_manifest(obj) if e.path == "metadata.name"]


FTJ_MAX = ftj_api.NAME_MAX_LENGTH
MDEP_MAX = mdep_api.NAME_MAX_LENGTH
QUEUE_63 = "q" * 63
LONGEST_FTJS = {
    "single-node": make_ftj(name_of_length(FTJ_MAX), queueName=QUEUE_63),
    "128-nodes": make_ftj(
        name_of_length(FTJ_MAX),
        nodes=ftj_api.MAX_NODES,
        queueName=QUEUE_63,
        resources={"gpus": 8, "gpuNodeSelector": {"nvidia.com/gpu.product": "v" * 63}},
    ),
    "dotted-name": make_ftj("a." + name_of_length(FTJ_MAX - 2)),
}
LONGEST_MDEPS = {
    "replicas": make_mdep(name_of_length(MDEP_MAX)),
    "gatewayAPI": make_mdep(
        name_of_length(MDEP_MAX),
        traffic={"mode": "gatewayAPI", "parentRefs": [{"name": "gw"}]},
        resources={"nodeSelector": {"pool": "p" * 63}, "priorityClassName": "high"},
    ),
}


# --- the bug -----------------------------------------------------------------------------------


def test_name_whose_job_name_would_exceed_63_chars_is_rejected() -> None:
    # 54 characters: "<name>-validate" is 63 and fits, but a 128-node job's pods would be
    # <name>-train-127 (64), so the one limit is 53; the first rule names the reason.
    too_long = make_ftj(name_of_length(FTJ_MAX + 1))
    errors = name_errors(too_long)
    assert len(errors) == 1, errors
    assert f"must be at most {FTJ_MAX} characters" in errors[0]
    assert FTJ_MAX == 53
    # What the API server would do with its children without the rule: refuse them.
    problems = child_problems(ftb.build_validate_job(make_ftj(name_of_length(64 - 9))))
    assert any("job-name" in p for p in problems), problems
    problems = child_problems(
        ftb.build_train_job(make_ftj(name_of_length(FTJ_MAX + 1), nodes=128), attempt=0)
    )
    assert any("pod hostname" in p for p in problems), problems
    # One character less is fine.
    assert name_errors(make_ftj(name_of_length(FTJ_MAX))) == []


def test_mdep_name_whose_service_name_would_exceed_63_chars_is_rejected() -> None:
    errors = name_errors(make_mdep(name_of_length(MDEP_MAX + 1)))
    assert len(errors) == 1 and f"must be at most {MDEP_MAX} characters" in errors[0], errors
    assert MDEP_MAX == 52
    assert name_errors(make_mdep(name_of_length(MDEP_MAX))) == []
    service = mdb.build_revision_service(make_mdep(name_of_length(MDEP_MAX + 1)), "f" * 10)
    assert child_problems(service), "a 64-character Service name must be refused"


@pytest.mark.parametrize(
    ("obj", "fragment"),
    [
        (make_ftj("2024.run", nodes=2, resources={"gpus": 1}), "DNS-1035"),
        (make_ftj("run-2024.1", nodes=2, resources={"gpus": 1}), "DNS-1035"),
        (make_ftj("1st-run", nodes=2, resources={"gpus": 1}), "DNS-1035"),
        (make_mdep("3b.chat"), "DNS-1035"),
        (make_mdep("1-chat"), "DNS-1035"),
    ],
    ids=[
        "ftj-dotted-multinode",
        "ftj-dotted-multinode-2",
        "ftj-digit-multinode",
        "mdep-dot",
        "mdep-digit",
    ],
)
def test_name_a_service_cannot_carry_is_rejected(obj: dict[str, Any], fragment: str) -> None:
    errors = name_errors(obj)
    assert len(errors) == 1 and fragment in errors[0], errors


def test_single_node_job_may_have_any_object_name_that_fits() -> None:
    # No Service and no hostname is derived from it: dots and a leading digit are fine.
    for name in ("2024.run", "1st-run", "a.b.c"):
        obj = make_ftj(name)
        assert name_errors(obj) == []
        for child in ftj_children(obj):
            assert child_problems(child) == []


@pytest.mark.parametrize("case", sorted(LONGEST_FTJS))
def test_longest_valid_name_gives_children_with_valid_names(case: str) -> None:
    ftj = LONGEST_FTJS[case]
    assert validate_manifest(ftj) == []
    ftj_api.FineTuneJob.model_validate(ftj)
    children = ftj_children(ftj)
    assert {c["kind"] for c in children} >= {"Job", "ServiceAccount", "Role", "RoleBinding"}
    for child in children:
        assert child_problems(child) == [], child["metadata"]["name"]
        kubernetes_validate.validate(child, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("case", sorted(LONGEST_MDEPS))
def test_longest_valid_mdep_name_gives_children_with_valid_names(case: str) -> None:
    md = LONGEST_MDEPS[case]
    assert validate_manifest(md) == []
    mdep_api.ModelDeployment.model_validate(md)
    for child in mdep_children(md):
        assert child_problems(child) == [], child["metadata"]["name"]
        if child["kind"] != "HTTPRoute":  # kubernetes-validate has no Gateway API schemas
            kubernetes_validate.validate(child, KUBE_VERSION, strict=True)


def test_child_checker_can_fail() -> None:
    """A checker that cannot fail is no checker."""
    ftj = make_ftj(name_of_length(60), nodes=2, resources={"gpus": 1})
    problems = [p for c in ftj_children(ftj) for p in child_problems(c)]
    assert any("job-name" in p for p in problems)
    assert any("pod hostname" in p for p in problems)
    assert any("not a valid Service name" in p for p in problems)
    assert _labels_problems({"kueue.x-k8s.io/queue-name": "a b"}, "Job")
    assert not is_dns1035_label("a.b") and not is_label_key("a/b/c") and is_label_key("a.io/b")


# --- one rule, evaluated alike offline and by the local runtime --------------------------------

PARITY_CASES = [
    make_ftj(name_of_length(FTJ_MAX)),
    make_ftj(name_of_length(FTJ_MAX + 1)),
    make_ftj("a.b"),
    make_ftj("a.b", nodes=2, resources={"gpus": 1}),
    make_ftj("7b", nodes=2, resources={"gpus": 1}),
    make_ftj("ab", nodes=2, resources={"gpus": 1}),
    make_mdep(name_of_length(MDEP_MAX)),
    make_mdep(name_of_length(MDEP_MAX + 1)),
    make_mdep("a.b"),
    make_mdep("7b"),
]


@pytest.mark.parametrize("obj", PARITY_CASES, ids=lambda o: f"{o['kind']}-{o['metadata']['name']}")
def test_cel_rules_and_pydantic_models_agree_on_names(obj: dict[str, Any]) -> None:
    model = ftj_api.FineTuneJob if obj["kind"] == "FineTuneJob" else mdep_api.ModelDeployment
    try:
        model.model_validate(obj)
        pydantic_ok = True
    except ValidationError as exc:
        pydantic_ok = False
        assert "metadata.name" in str(exc)
    assert (name_errors(obj) == []) is pydantic_ok


def test_generate_name_is_checked_as_the_name_it_generates() -> None:
    # The API server fills in <generateName[:58]><5 random> before validation runs.
    obj = make_ftj("x")
    del obj["metadata"]["name"]
    obj["metadata"]["generateName"] = "run-"
    assert validate_manifest(obj) == []
    obj["metadata"]["generateName"] = name_of_length(FTJ_MAX - 6) + "-"
    assert validate_manifest(obj) == []  # 48 + 5 = 53
    obj["metadata"]["generateName"] = name_of_length(FTJ_MAX - 5) + "-"
    assert [e.path for e in validate_manifest(obj)] == ["metadata.name"]  # 49 + 5 = 54
    obj["metadata"]["generateName"] = name_of_length(70) + "-"
    assert [e.path for e in validate_manifest(obj)] == ["metadata.name"]  # cut to 58, + 5


def test_other_metadata_is_neither_pruned_nor_reported() -> None:
    obj = make_mdep("chat")
    obj["metadata"].update(labels={"team": "a"}, annotations={"note": "x"}, generation=3)
    assert validate_manifest(obj) == []


def test_crd_root_rules_point_at_metadata_name_which_the_schema_declares() -> None:
    # The API server refuses a fieldPath that does not resolve in the schema (ValidFieldPath).
    for crd in all_crds().values():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        rules = schema["x-kubernetes-validations"]
        assert rules and all(r["fieldPath"] == ".metadata.name" for r in rules)
        assert set(schema["properties"]["metadata"]["properties"]) == {"name"}
        assert all("self.metadata.name" in r["rule"] for r in rules)


# --- spec fields that become label values or name other objects --------------------------------


@pytest.mark.parametrize(
    ("obj", "path", "fragment"),
    [
        (make_ftj("j", queueName="team a"), "spec.queueName", "label value"),
        (make_ftj("j", queueName="q" * 64), "spec.queueName", "may not be longer than 63"),
        (make_ftj("j", queueName="-q"), "spec.queueName", "label value"),
        (
            make_ftj("j", resources={"gpuNodeSelector": {"pool": "a/b"}}),
            "spec.resources.gpuNodeSelector.pool",
            "label value",
        ),
        (
            make_ftj("j", resources={"priorityClassName": "High"}),
            "spec.resources.priorityClassName",
            "DNS-1123 subdomain",
        ),
        (
            make_ftj("j", resources={"tolerations": [{"key": "a b", "operator": "Exists"}]}),
            "spec.resources.tolerations[0].key",
            "label key",
        ),
        (
            make_ftj("j", resources={"tolerations": [{"key": "k", "value": "v" * 64}]}),
            "spec.resources.tolerations[0].value",
            "may not be longer than 63",
        ),
        (
            make_ftj("j", storage={"credentialsSecret": "S3_creds"}),
            "spec.storage.credentialsSecret",
            "DNS-1123 subdomain",
        ),
        (
            make_mdep("m", resources={"nodeSelector": {"pool": "x" * 64}}),
            "spec.resources.nodeSelector.pool",
            "may not be longer than 63",
        ),
        (
            make_mdep("m", storage={"serviceAccountName": "Reader"}),
            "spec.storage.serviceAccountName",
            "DNS-1123 subdomain",
        ),
    ],
)
def test_spec_field_that_ends_up_in_a_child_is_validated(
    obj: dict[str, Any], path: str, fragment: str
) -> None:
    errors = validate_manifest(obj)
    assert [e.path for e in errors] == [path], errors
    assert fragment in str(errors[0])


def test_queue_name_of_63_characters_and_empty_keys_are_fine() -> None:
    assert validate_manifest(make_ftj("j", queueName="q" * 63)) == []
    tolerations = [{"operator": "Exists"}, {"key": "", "operator": "Exists"}]
    assert validate_manifest(make_ftj("j", resources={"tolerations": tolerations})) == []
    ftj_api.FineTuneJobSpec.model_validate(make_ftj("j", queueName="q" * 63)["spec"])
    with pytest.raises(ValidationError):
        ftj_api.FineTuneJobSpec.model_validate(make_ftj("j", queueName="q" * 64)["spec"])
