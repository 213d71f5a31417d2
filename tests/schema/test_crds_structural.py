"""The committed CRDs are what an API server accepts: valid objects and structural schemas.

Covers:
- each file in ``crds/`` is a valid apiextensions.k8s.io/v1 CustomResourceDefinition for
  kubernetes-validate (strict: no unknown fields);
- the names are consistent (``<plural>.<group>``), exactly one version is the storage version,
  the status subresource is on, printer columns use JSONPaths into the object;
- every openAPIV3Schema is *structural* (the rules the API server enforces since
  apiextensions/v1): a non-empty type on every node (unless int-or-string or
  preserve-unknown-fields), no ``properties`` together with ``additionalProperties``, nothing
  but value validations inside allOf/anyOf/oneOf/not, and ``metadata`` restricted to name;
- every default validates against its own schema (the API server refuses such CRDs) and every
  CEL rule compiles, with a message;
- a checker that cannot fail is no checker: a broken schema is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from kubetune.api.validation import _cel_errors, to_json_schema

REPO = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((REPO / "crds").glob("*.yaml"))
KUBE_VERSION = "1.30"

JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
# Inside a junctor only value validations are allowed (no type/default/description/...).
FORBIDDEN_IN_JUNCTORS = (
    "type",
    "default",
    "description",
    "nullable",
    "additionalProperties",
    "x-kubernetes-preserve-unknown-fields",
)


def structural_problems(schema: dict[str, Any], path: str = "", root: bool = True) -> list[str]:
    """Every violation of the structural-schema rules below ``schema`` (empty list: structural)."""
    problems: list[str] = []
    exempt = schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if not schema.get("type") and not exempt:
        problems.append(f"{path or '<root>'}: no type")
    if root and schema.get("type") != "object":
        problems.append("<root>: type must be object")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if schema.get("additionalProperties") is False:
        problems.append(f"{path}: additionalProperties: false is not allowed")
    for junctor in JUNCTORS:
        subs = schema.get(junctor)
        for sub in subs if isinstance(subs, list) else [subs] if isinstance(subs, dict) else []:
            for key in FORBIDDEN_IN_JUNCTORS:
                if key in sub:
                    problems.append(
                        f"{path}.{junctor}: {key} is not allowed inside a logical junctor"
                    )
    for name, sub in (schema.get("properties") or {}).items():
        sub_path = f"{path}.{name}" if path else name
        if root and name == "metadata":
            extra = set(sub.get("properties") or {}) - {"name", "generateName"}
            if extra:
                problems.append(
                    f"metadata: only name and generateName may be restricted, not {sorted(extra)}"
                )
        problems += structural_problems(sub, sub_path, root=False)
    if isinstance(schema.get("items"), dict):
        problems += structural_problems(schema["items"], f"{path}[*]", root=False)
    elif "items" in schema:
        problems.append(f"{path}: items must be one schema")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}{{*}}", root=False)
    return problems


def default_and_rule_problems(schema: dict[str, Any], path: str = "") -> list[str]:
    """Defaults that do not validate against their schema, CEL rules that do not compile."""
    problems: list[str] = []
    if "default" in schema:
        json_schema = to_json_schema(schema)
        errors = list(jsonschema.Draft4Validator(json_schema).iter_errors(schema["default"]))
        if errors:
            problems.append(
                f"{path}: default {schema['default']!r} is invalid: {errors[0].message}"
            )
        # The API server also runs the CEL rules on a default as it is written, nested defaults
        # NOT filled in: a rule reading a key the default lacks refuses the whole CRD.
        for error in _cel_errors(schema["default"], None, schema, path, False):
            problems.append(f"{path}: default {schema['default']!r} fails its CEL rule: {error.message}")
    for entry in schema.get("x-kubernetes-validations") or []:
        if not entry.get("message"):
            problems.append(f"{path}: rule {entry.get('rule')!r} has no message")
        try:
            celpy.Environment().compile(entry["rule"])
        except Exception as exc:  # noqa: BLE001 - any compile failure is the finding
            problems.append(f"{path}: rule {entry['rule']!r} does not compile: {exc}")
    for name, sub in (schema.get("properties") or {}).items():
        problems += default_and_rule_problems(sub, f"{path}.{name}" if path else name)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            problems += default_and_rule_problems(schema[key], f"{path}[*]")
    return problems


def _crds() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in CRD_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


CRDS = _crds()


def test_both_crds_are_there() -> None:
    assert sorted(crd["spec"]["names"]["kind"] for _, crd in CRDS) == [
        "FineTuneJob",
        "ModelDeployment",
    ]


@pytest.mark.parametrize(("name", "crd"), CRDS, ids=[n for n, _ in CRDS])
def test_crd_is_a_valid_kubernetes_object(name: str, crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    spec = crd["spec"]
    assert (
        crd["metadata"]["name"]
        == f"{spec['names']['plural']}.{spec['group']}"
        == name.removesuffix(".yaml")
    )
    assert [v["name"] for v in spec["versions"] if v["storage"]] == ["v1alpha1"]
    for version in spec["versions"]:
        assert version["subresources"]["status"] == {}
        for column in version.get("additionalPrinterColumns", []):
            assert column["jsonPath"].startswith((".status.", ".spec.", ".metadata.")), column
            assert column["type"] in ("string", "integer", "number", "boolean", "date")


@pytest.mark.parametrize(("name", "crd"), CRDS, ids=[n for n, _ in CRDS])
def test_crd_schema_is_structural(name: str, crd: dict[str, Any]) -> None:
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        assert structural_problems(schema) == []
        assert default_and_rule_problems(schema) == []


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "object", "properties": {"a": {"description": "no type"}}}, "a: no type"),
        (
            {
                "type": "object",
                "properties": {
                    "m": {
                        "type": "object",
                        "properties": {},
                        "additionalProperties": {"type": "string"},
                    }
                },
            },
            "mutually exclusive",
        ),
        (
            {
                "type": "object",
                "properties": {"x": {"type": "string", "anyOf": [{"type": "string"}]}},
            },
            "not allowed inside a logical junctor",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}}
                },
            },
            "only name and generateName",
        ),
        ({"type": "string"}, "root>: type must be object"),
    ],
)
def test_structural_checker_finds_violations(schema: dict[str, Any], problem: str) -> None:
    assert any(problem in p for p in structural_problems(schema)), structural_problems(schema)


def test_default_and_rule_checker_finds_violations() -> None:
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 1, "default": 0},
            "s": {
                "type": "string",
                "x-kubernetes-validations": [{"rule": "self ==", "message": "m"}],
            },
        },
    }
    problems = default_and_rule_problems(schema)
    assert any(p.startswith("n: default 0 is invalid") for p in problems)
    assert any("does not compile" in p for p in problems)


def test_default_that_fails_its_own_cel_rule_is_found_as_the_api_server_finds_it() -> None:
    """Bug found by the real API server: modeldeployments.kubetune.io was refused because
    ``traffic: {default: {}}`` ran ``self.mode != 'gatewayAPI' || ...`` on ``{}`` ("no such key:
    mode"). The rules now guard with has(); this checker finds the unguarded form offline."""
    unguarded = {
        "type": "object",
        "properties": {
            "traffic": {
                "type": "object",
                "default": {},
                "properties": {"mode": {"type": "string", "default": "auto"}},
                "x-kubernetes-validations": [{"rule": "self.mode != 'gatewayAPI'", "message": "m"}],
            }
        },
    }
    problems = default_and_rule_problems(unguarded)
    assert any("traffic: default {} fails its CEL rule" in p for p in problems), problems
    guarded = unguarded["properties"]["traffic"]["x-kubernetes-validations"][0]
    guarded["rule"] = "!has(self.mode) || self.mode != 'gatewayAPI'"
    assert default_and_rule_problems(unguarded) == []


def undocumented_fields(schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields without a description (``kubectl explain`` would show nothing for them)."""
    missing = []
    for name, sub in (schema.get("properties") or {}).items():
        sub_path = f"{path}.{name}" if path else name
        if (
            name not in ("apiVersion", "kind", "metadata")
            and not str(sub.get("description", "")).strip()
        ):
            missing.append(sub_path)
        missing += undocumented_fields(sub, sub_path)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            missing += undocumented_fields(schema[key], f"{path}[*]")
    return missing


@pytest.mark.parametrize(("name", "crd"), CRDS, ids=[n for n, _ in CRDS])
def test_kubectl_explain_has_text_for_every_field(name: str, crd: dict[str, Any]) -> None:
    for version in crd["spec"]["versions"]:
        schema = version["schema"]["openAPIV3Schema"]
        assert schema.get("description"), "the kind itself needs a description"
        assert undocumented_fields(schema) == []


@pytest.mark.parametrize(("name", "crd"), CRDS, ids=[n for n, _ in CRDS])
def test_kubectl_get_shows_phase_and_age_columns(name: str, crd: dict[str, Any]) -> None:
    (version,) = crd["spec"]["versions"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Age"] == ".metadata.creationTimestamp"
    assert crd["spec"]["names"]["shortNames"] and "kubetune" in crd["spec"]["names"]["categories"]
