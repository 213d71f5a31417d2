"""Generate the CustomResourceDefinitions from the pydantic models (the single source of truth).

``kubetune crds`` writes ``crds/*.yaml``; ``kubetune crds --check`` fails when the committed
files drift from the models. The conversion turns pydantic's JSON Schema (draft 2020-12, with
``$defs``/``$ref`` and ``anyOf [X, null]`` for optionals) into a *structural* OpenAPI v3.0
schema as the API server demands: every ``$ref`` inlined, no ``anyOf`` of types, no
``additionalProperties: false`` beside ``properties``, boolean ``exclusiveMinimum``.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault

from kubetune.api import finetunejob as ftj
from kubetune.api import modeldeployment as mdep
from kubetune.api.common import GROUP, VERSION

# Keys pydantic emits that a structural schema has no use for.
_DROP_KEYS = {"title", "$defs", "discriminator"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Recursively resolve $ref, collapse Optional, and rewrite keywords to OpenAPI v3.0."""
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        merged = copy.deepcopy(target)
        # Field-level siblings of $ref (description, default, CEL rules) win over the model's.
        for key, value in node.items():
            if key == "x-kubernetes-validations":
                merged[key] = merged.get(key, []) + value
            else:
                merged[key] = value
        node = merged
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions are not structural: {options}")
        inner = _inline(options[0], defs)
        for key, value in node.items():
            if key == "x-kubernetes-validations":
                inner[key] = inner.get(key, []) + value
            else:
                inner[key] = value
        node = inner
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS:
            continue
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
            continue
        if key == "additionalProperties" and value is False:
            continue
        if key == "additionalProperties" and value is True:
            # An open object (a core/v1 sub-object passed as written, a sidecar's other
            # Container fields): structural schemas say so with preserve-unknown-fields.
            out["x-kubernetes-preserve-unknown-fields"] = True
            continue
        if key == "properties":
            out[key] = {k: _inline(v, defs) for k, v in value.items()}
            continue
        if key == "default" and value is None:
            continue
        out[key] = _inline(value, defs)
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


class _CrdJsonSchema(GenerateJsonSchema):
    """Also publish ``default_factory`` defaults, so the API server defaults what pydantic does.

    Without them a CR that omits ``spec.method`` stores no ``method`` at all, and a CEL rule
    reading ``self.method.type`` fails with "no such key" on the cluster while the operator's
    pydantic parse would have filled it in. A sub-model default is published as ``{}``: the API
    server then applies the nested defaults itself (structural defaulting), so the CRD carries
    each default once, at its leaf.
    """

    def get_default_value(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is None or schema.get("default_factory_takes_data"):
            return super().get_default_value(schema)
        value = factory()
        if isinstance(value, BaseModel):
            return {}
        if isinstance(value, list) and any(isinstance(v, BaseModel) for v in value):
            return [v.model_dump(by_alias=True, exclude_none=True, mode="json") for v in value]
        return value if value is not None else NoDefault


def _schema_of(model: type, strip_required: bool = False) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_CrdJsonSchema)
    schema = _inline(raw, raw.get("$defs", {}))
    return schema


def _mark_conditions(status_schema: dict[str, Any]) -> None:
    cond = status_schema["properties"].get("conditions")
    if cond:
        cond["x-kubernetes-list-type"] = "map"
        cond["x-kubernetes-list-map-keys"] = ["type"]


def _crd(
    kind: str,
    plural: str,
    short_names: list[str],
    spec_model: type,
    status_model: type,
    columns: list[dict[str, Any]],
    description: str,
    root_rules: tuple[dict[str, Any], ...] = (),
    scale: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec_schema = _schema_of(spec_model)
    status_schema = _schema_of(status_model)
    _mark_conditions(status_schema)
    open_api = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "kubetune.io/v1alpha1"},
            "kind": {"type": "string", "description": kind},
            # Declared (type only) so that root rules can point their fieldPath at
            # .metadata.name; a CRD may restrict nothing in metadata but name and generateName.
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "description": "Name of the object; children are named after it (see the rules on metadata.name).",
                    }
                },
            },
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    if root_rules:
        # Rules on metadata.name: CEL can read metadata.name (and generateName) only at the root.
        open_api["x-kubernetes-validations"] = [dict(rule) for rule in root_rules]
    subresources: dict[str, Any] = {"status": {}}
    if scale is not None:
        for path in scale.values():
            _require_status_or_spec_field(status_schema, spec_schema, path)
        subresources["scale"] = dict(scale)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/part-of": "kubetune"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": subresources,
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": open_api},
                }
            ],
        },
    }


def _require_status_or_spec_field(
    status_schema: dict[str, Any], spec_schema: dict[str, Any], path: str
) -> None:
    """A scale path must name a field the schema declares (the API server only checks the syntax).

    A typo in ``statusReplicasPath`` would make every ``GET .../scale`` answer 0 replicas and
    an HPA scale from a wrong count, without any error anywhere.
    """
    section, _, field = path.removeprefix(".").partition(".")
    schema = {"spec": spec_schema, "status": status_schema}.get(section)
    if schema is None or field not in schema.get("properties", {}):
        raise ValueError(f"scale subresource path {path} names no field of the schema")


def finetunejob_crd() -> dict[str, Any]:
    """The FineTuneJob CRD."""
    return _crd(
        ftj.KIND,
        ftj.PLURAL,
        ftj.SHORT_NAMES,
        ftj.FineTuneJobSpec,
        ftj.FineTuneJobStatus,
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent", "description": "Percent of steps done"},
            {"name": "Eval loss", "type": "number", "jsonPath": ".status.metrics.evalLoss"},
            {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
            {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
            {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "FineTuneJob validates a dataset, fine-tunes a base model (LoRA, QLoRA or full) with "
        "platform-owned checkpoints and automatic resume, and publishes the artifact with lineage.",
        ftj.NAME_RULES,
    )


def modeldeployment_crd() -> dict[str, Any]:
    """The ModelDeployment CRD."""
    return _crd(
        mdep.KIND,
        mdep.PLURAL,
        mdep.SHORT_NAMES,
        mdep.ModelDeploymentSpec,
        mdep.ModelDeploymentStatus,
        [
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas", "description": "Pods of the stable revision"},
            {"name": "Stable", "type": "string", "jsonPath": ".status.stable.name"},
            {"name": "Canary", "type": "string", "jsonPath": ".status.canary.name"},
            {"name": "Weight", "type": "integer", "jsonPath": ".status.weights.canary", "description": "Canary traffic percent"},
            {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        "ModelDeployment serves a base model plus adapter through an OpenAI-compatible server and "
        "rolls every new revision out as a canary with analysis and automatic rollback.",
        mdep.NAME_RULES,
        # kubectl scale, an HPA or a KEDA ScaledObject write spec.replicas through /scale; the
        # operator splits it between the revisions' Deployments (docs/operations.md, Autoscaling).
        scale=mdep.SCALE_SUBRESOURCE,
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """File name -> CRD object, as committed under crds/."""
    return {
        f"{ftj.PLURAL}.{GROUP}.yaml": finetunejob_crd(),
        f"{mdep.PLURAL}.{GROUP}.yaml": modeldeployment_crd(),
    }


def render(crd: dict[str, Any]) -> str:
    """Stable YAML text of one CRD (the committed form)."""
    header = "# Generated by `kubetune crds` from operator/kubetune/api. Do not edit.\n"
    return header + yaml.safe_dump(crd, sort_keys=False, width=100)
