"""Validate kubetune manifests exactly as the API server would with our CRDs, without a cluster.

The API server handles a custom resource in a fixed order, and so does :func:`validate_manifest`:

1. **Pruning.** Fields the structural schema does not know are dropped silently by a cluster
   (and rejected by ``kubectl --validate=strict``). A misspelt ``learningrate`` would vanish
   without a word, so here an unknown field is an *error* naming its path.
2. **Defaulting.** Every ``default`` of the schema is applied, nested ones after their parent's
   (a ``default: {}`` object then gets its leaves' defaults). CEL rules see the defaulted object.
3. **OpenAPI v3.0 schema.** Types, enums, patterns, min/max (with OpenAPI 3.0's *boolean*
   ``exclusiveMinimum``), lengths, required fields: checked with ``jsonschema``'s Draft 4
   validator, whose keyword semantics are the ones OpenAPI 3.0 borrowed.
4. **CEL.** Every ``x-kubernetes-validations`` rule is compiled and run with cel-python, with
   ``self`` typed from the schema (``number`` is a CEL double even when written ``1``).
   Transition rules (those that read ``oldSelf``) run only on an update, when the old object
   has the same field, as on a cluster. Rules at the root see ``metadata.name`` and
   ``metadata.generateName`` only (all a cluster shows them), the name that ``generateName``
   would get filled in. The Kubernetes CEL list library functions our rules use
   (``isSorted``, ``sum``, ``min``, ``max``, ``indexOf``, ``lastIndexOf``) are registered.

The schema is the generated CRD (``kubetune.api.crds``), the same object ``crds/`` is written
from, so what passes here passes on a cluster. Error paths use Kubernetes' field-path form
(``spec.rollout.steps[1].setWeight``); errors found in files also carry the file name, the
document index and the line.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes

from kubetune.api.common import API_VERSION, PATTERN_MEANINGS

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

# metadata.name of a namespaced custom resource: a DNS-1123 subdomain (the API server checks it
# before the CRD schema is consulted).
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Error:
    """One validation failure, worded like the API server's field errors.

    ``path`` is the Kubernetes field path (``spec.method.lora.r``); ``kind`` the error type
    (``Required value``, ``Invalid value``, ``Unsupported value``, ``Too many``, ``unknown
    field``); ``message`` what is wrong (for a CEL rule: the rule's message). ``rule`` is the CEL
    expression or the schema keyword that failed. ``file``, ``document`` (0-based index in a
    multi-document YAML file) and ``line`` (1-based) are set for errors found in files.
    """

    path: str
    message: str
    kind: str = "Invalid value"
    rule: str | None = None
    file: str | None = None
    document: int | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}"
            if self.line is not None:
                where += f":{self.line}"
            if self.document is not None:
                where += f" (document {self.document})"
            where += ": "
        return f"{where}{self.path}: {self.kind}: {self.message}"


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------


@functools.cache
def _schemas() -> dict[str, dict[str, Any]]:
    """kind -> openAPIV3Schema of the served version, from the generated CRDs."""
    # Imported here: crds imports the models, which is all this module needs at import time.
    from kubetune.api.crds import all_crds

    out = {}
    for crd in all_crds().values():
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        out[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return out


def supported_kinds() -> tuple[str, ...]:
    """The kinds :func:`validate_manifest` knows (the kubetune.io custom resources)."""
    return tuple(sorted(_schemas()))


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    """Whether ``value`` has the schema's type (so walking into it makes sense)."""
    kind = schema.get("type")
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    return True


# ---------------------------------------------------------------------------------------------
# 1. pruning (unknown fields) and 2. defaulting
# ---------------------------------------------------------------------------------------------


def _unknown_fields(value: Any, schema: dict[str, Any], path: str) -> Iterator[Error]:
    """Fields a cluster would prune: not in ``properties`` and no open map allows them."""
    if not _type_ok(value, schema) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            if not path and key == "metadata":
                continue  # ObjectMeta: the API server's own, never pruned by the CRD schema
            if props is not None and key in props:
                yield from _unknown_fields(sub, props[key], _join(path, key))
            elif isinstance(extra, dict):
                yield from _unknown_fields(sub, extra, _join(path, key))
            elif props is not None:
                yield Error(
                    _join(path, key),
                    f'unknown field "{_join(path, key)}" (a cluster would drop it silently; check the spelling)',
                    kind="unknown field",
                    rule="structural schema",
                )
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from _unknown_fields(item, schema["items"], _join(path, i))


def apply_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """A copy of ``value`` with the schema's defaults applied, as the API server stores it."""
    value = copy.deepcopy(value)
    _default_in_place(value, schema)
    return value


def _default_in_place(value: Any, schema: dict[str, Any]) -> None:
    if isinstance(value, dict) and schema.get("type") == "object":
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                _default_in_place(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in value:
                _default_in_place(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_in_place(item, schema["items"])


# ---------------------------------------------------------------------------------------------
# 3. OpenAPI v3.0 schema through jsonschema
# ---------------------------------------------------------------------------------------------

# Keys of a structural schema that are not JSON Schema keywords (jsonschema would ignore them,
# but dropping them keeps the validator's schema small and its errors free of noise).
_K8S_KEYS = (
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-map-type",
)


def to_json_schema(schema: Any) -> Any:
    """An OpenAPI v3.0 structural schema as a Draft 4 JSON Schema.

    Draft 4 is the dialect OpenAPI 3.0 is built on: ``exclusiveMinimum: true`` modifies
    ``minimum`` exactly as in a CRD, and ``integer`` rejects ``1.5``. ``nullable: true`` becomes
    a ``null`` type alternative; Kubernetes-only keys are dropped; ``format`` is dropped because
    the API server checks only a few formats and none of ours.
    """
    if isinstance(schema, list):
        return [to_json_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _K8S_KEYS or key in ("format", "description", "default", "example"):
            continue
        if key == "properties":
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        out.pop("nullable", None)
    return out


@functools.cache
def _validator(kind: str) -> jsonschema.Draft4Validator:
    schema = to_json_schema(_schemas()[kind])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def _path_of(parts: Iterable[Any]) -> str:
    path = ""
    for part in parts:
        path = _join(path, part)
    return path


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _schema_error(err: jsonschema.ValidationError) -> Error:
    """One jsonschema error worded as the API server words it."""
    path = _path_of(err.absolute_path)
    v, val, inst = err.validator, err.validator_value, err.instance
    sch = err.schema if isinstance(err.schema, dict) else {}
    if v == "required":
        missing = re.match(r"'([^']+)' is a required property", err.message)
        name = missing.group(1) if missing else str(val)
        return Error(_join(path, name), "Required value", kind="Required value", rule="required")
    if v == "enum":
        supported = ", ".join(_show(x) for x in val)
        return Error(path, f"{_show(inst)}: supported values: {supported}", kind="Unsupported value", rule="enum")
    if v == "type":
        return Error(path, f"{_show(inst)}: must be of type {val}", rule="type")
    if v == "minimum":
        op = "greater than" if sch.get("exclusiveMinimum") else "greater than or equal to"
        return Error(path, f"{_show(inst)}: should be {op} {val}", rule="minimum")
    if v == "maximum":
        op = "less than" if sch.get("exclusiveMaximum") else "less than or equal to"
        return Error(path, f"{_show(inst)}: should be {op} {val}", rule="maximum")
    if v == "pattern":
        meaning = PATTERN_MEANINGS.get(val)
        why = f" ({meaning})" if meaning else ""
        return Error(path, f"{_show(inst)}: should match '{val}'{why}", rule="pattern")
    if v == "maxItems":
        return Error(path, f"{len(inst)}: must have at most {val} items", kind="Too many", rule="maxItems")
    if v == "minItems":
        return Error(path, f"{len(inst)}: should have at least {val} items", rule="minItems")
    if v == "maxLength":
        return Error(path, f"{_show(inst)}: may not be longer than {val}", kind="Too long", rule="maxLength")
    if v == "minLength":
        return Error(path, f"{_show(inst)}: should be at least {val} chars long", rule="minLength")
    return Error(path, err.message, rule=str(v))


# ---------------------------------------------------------------------------------------------
# 4. CEL rules
# ---------------------------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return list(value)


def _is_sorted(value: Any) -> celtypes.BoolType:
    """Kubernetes CEL list library: ``list.isSorted()`` (non-decreasing order)."""
    items = _as_list(value)
    return celtypes.BoolType(all(items[i] <= items[i + 1] for i in range(len(items) - 1)))


def _sum(value: Any) -> Any:
    """Kubernetes CEL list library: ``list.sum()`` (0 of the element type for an empty list)."""
    items = _as_list(value)
    if not items:
        return celtypes.IntType(0)
    total = items[0]
    for item in items[1:]:
        total = total + item
    return total


def _min(value: Any) -> Any:
    """Kubernetes CEL list library: ``list.min()`` (an error on an empty list)."""
    items = _as_list(value)
    if not items:
        raise ValueError("min called on an empty list")
    return min(items)


def _max(value: Any) -> Any:
    """Kubernetes CEL list library: ``list.max()`` (an error on an empty list)."""
    items = _as_list(value)
    if not items:
        raise ValueError("max called on an empty list")
    return max(items)


def _index_of(value: Any, needle: Any) -> celtypes.IntType:
    """``list.indexOf(x)`` (and ``string.indexOf`` is not used by our rules): -1 if absent."""
    items = _as_list(value)
    return celtypes.IntType(items.index(needle) if needle in items else -1)


def _last_index_of(value: Any, needle: Any) -> celtypes.IntType:
    """``list.lastIndexOf(x)``: -1 if absent."""
    items = _as_list(value)
    for i in range(len(items) - 1, -1, -1):
        if items[i] == needle:
            return celtypes.IntType(i)
    return celtypes.IntType(-1)


K8S_CEL_FUNCTIONS = {
    "isSorted": _is_sorted,
    "sum": _sum,
    "min": _min,
    "max": _max,
    "indexOf": _index_of,
    "lastIndexOf": _last_index_of,
}

_OLD_SELF = re.compile(r"\boldSelf\b")


@functools.cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule), functions=K8S_CEL_FUNCTIONS)


def to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """A JSON value as the CEL value the API server would bind, typed by the schema."""
    kind = schema.get("type")
    if schema.get("x-kubernetes-preserve-unknown-fields") and kind in (None, "object") and not schema.get("properties"):
        return celpy.json_to_cel(value)
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out = {}
        for key, sub in value.items():
            sub_schema = props.get(key) or (extra if isinstance(extra, dict) else {})
            out[celtypes.StringType(key)] = to_cel(sub, sub_schema)
        return celtypes.MapType(out)
    if kind == "array" and isinstance(value, list):
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return celtypes.ListType([to_cel(v, items) for v in value])
    if kind == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return celtypes.IntType(value)
    return celpy.json_to_cel(value)


def _rule_path(path: str, field_path: str | None) -> str:
    if not field_path:
        return path
    rel = field_path.lstrip(".")
    if rel.startswith("["):
        return f"{path}{rel}"
    return f"{path}.{rel}" if path else rel


def _cel_errors(value: Any, old: Any, schema: dict[str, Any], path: str, has_old: bool) -> Iterator[Error]:
    """Run every rule at this node and below (old and new correlated as the API server does)."""
    if not _type_ok(value, schema):
        return
    for entry in schema.get("x-kubernetes-validations") or []:
        rule = entry["rule"]
        transition = bool(_OLD_SELF.search(rule))
        if transition and not has_old:
            continue  # transition rules run only on update, when the field existed before
        activation = {"self": to_cel(value, schema)}
        if transition:
            activation["oldSelf"] = to_cel(old, schema)
        where = _rule_path(path, entry.get("fieldPath"))
        try:
            result = _program(rule).evaluate(activation)
        except Exception as exc:  # noqa: BLE001 - any evaluation failure rejects the object
            yield Error(where, f"rule could not be evaluated ({exc}): {entry['message']}", rule=rule)
            continue
        if isinstance(result, Exception):
            yield Error(where, f"rule could not be evaluated ({result}): {entry['message']}", rule=rule)
        elif not bool(result):
            yield Error(where, f"{_show(value)}: {entry['message']}", rule=rule)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        old_map = old if has_old and isinstance(old, dict) else {}
        for key, sub in value.items():
            sub_schema = props.get(key) or (extra if isinstance(extra, dict) else None)
            if sub_schema is None:
                continue
            yield from _cel_errors(sub, old_map.get(key), sub_schema, _join(path, key), key in old_map)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        # Only map lists correlate old and new items (by their keys); atomic lists do not, so
        # transition rules below them do not run, exactly as on a cluster.
        keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
        old_items: dict[tuple, Any] = {}
        if keys and has_old and isinstance(old, list):
            old_items = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, dict)}
        for i, item in enumerate(value):
            key = tuple(item.get(k) for k in keys) if keys and isinstance(item, dict) else None
            yield from _cel_errors(item, old_items.get(key), items, _join(path, i), key in old_items)


# ---------------------------------------------------------------------------------------------
# The entry points
# ---------------------------------------------------------------------------------------------


def _metadata_errors(obj: dict[str, Any]) -> Iterator[Error]:
    """The API server's own checks of ObjectMeta (before the CRD schema is consulted)."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        yield Error("metadata", "Required value", kind="Required value")
        return
    name = meta.get("name")
    if not name and not meta.get("generateName"):
        yield Error("metadata.name", "Required value: name or generateName is required", kind="Required value")
    elif name is not None:
        if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            yield Error(
                "metadata.name",
                f"{_show(name)}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character",
            )
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not _DNS_LABEL.match(ns)):
        yield Error("metadata.namespace", f"{_show(ns)}: must be a lowercase RFC 1123 label")
    for field in ("labels", "annotations"):
        if field in meta and not (
            isinstance(meta[field], dict) and all(isinstance(v, str) for v in meta[field].values())
        ):
            yield Error(f"metadata.{field}", "must be a map of string keys to string values")


# The API server's name generator: generateName cut to 58 characters plus 5 random ones. It runs
# before validation, so rules at the root see the generated metadata.name.
_GENERATED_PREFIX_MAX = 58
_GENERATED_SUFFIX = "zzzzz"


def _as_cel_sees_it(obj: Any) -> Any:
    """The object as rules at the root see it: metadata holds only name and generateName.

    CEL can read no other metadata field (a rule reading one would not compile on a cluster),
    and a name that ``generateName`` asks for is filled in as the API server would.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
        return obj
    meta = obj["metadata"]
    seen = {key: meta[key] for key in ("name", "generateName") if key in meta}
    generate = seen.get("generateName")
    if not seen.get("name") and isinstance(generate, str) and generate:
        seen["name"] = generate[:_GENERATED_PREFIX_MAX] + _GENERATED_SUFFIX
    return {**obj, "metadata": seen}


def validate_manifest(obj: Any, old: Any = None) -> list[Error]:
    """Every reason the API server (with our CRDs, under strict field validation) would refuse ``obj``.

    ``old`` is the stored object for an update: transition rules (``oldSelf``, e.g. "baseModel is
    immutable") run against it. An empty list means the object would be accepted.
    """
    if not isinstance(obj, dict):
        return [Error("", f"a manifest must be a mapping, got {type(obj).__name__}")]
    kind = obj.get("kind")
    if obj.get("apiVersion") != API_VERSION:
        return [Error("apiVersion", f"{_show(obj.get('apiVersion'))}: kubetune manifests use {API_VERSION}")]
    if kind not in _schemas():
        supported = ", ".join(_show(k) for k in supported_kinds())
        return [Error("kind", f"{_show(kind)}: supported values: {supported}", kind="Unsupported value")]
    schema = _schemas()[kind]
    meta_errors = list(_metadata_errors(obj))
    errors = list(meta_errors)
    # metadata is validated above and by the API server itself; the CRD schema declares only
    # metadata.name (for the rules at the root), so pruning skips metadata and defaulting has
    # nothing to do there.
    errors += _unknown_fields(obj, schema, "")
    known = _prune(obj, schema)
    value = apply_defaults(known, schema)
    schema_errors = [_schema_error(e) for e in _validator(kind).iter_errors(value)]
    errors += sorted(schema_errors, key=lambda e: e.path)
    old_value = None
    if old is not None:
        old_value = _as_cel_sees_it(apply_defaults(_prune(old, schema), schema))
    cel_errors = list(_cel_errors(_as_cel_sees_it(value), old_value, schema, "", old is not None))
    if schema_errors or meta_errors:
        # A value of the wrong type makes rules above it fail to evaluate; the schema error
        # already says what is wrong, so only real rule verdicts are added.
        cel_errors = [e for e in cel_errors if not e.message.startswith("rule could not be evaluated")]
    errors += cel_errors
    return errors


def _prune(value: Any, schema: dict[str, Any], root: bool = True) -> Any:
    """The object as a cluster would store it: unknown fields dropped (metadata kept whole)."""
    if not _type_ok(value, schema) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, sub in value.items():
            if root and key == "metadata":
                out[key] = copy.deepcopy(sub)
            elif props is not None and key in props:
                out[key] = _prune(sub, props[key], root=False)
            elif isinstance(extra, dict):
                out[key] = _prune(sub, extra, root=False)
            elif props is None:
                out[key] = copy.deepcopy(sub)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(v, schema["items"], root=False) for v in value]
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _line_of(node: yaml.Node | None, path: str) -> int | None:
    """1-based line of the deepest YAML node along a field path (the field itself when present)."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if match is None:
                break
            key_node = next(k for k, v in node.value if v is match)
            line = key_node.start_mark.line + 1
            node = match
        elif isinstance(node, yaml.SequenceNode) and part.startswith("["):
            index = int(part[1:-1])
            if index >= len(node.value):
                break
            node = node.value[index]
            line = node.start_mark.line + 1
        else:
            break
    return line


def validate_text(text: str, file: str = "<string>", old: Any = None) -> tuple[int, list[Error]]:
    """Validate every kubetune document of a YAML/JSON text: (documents checked, errors).

    Documents of other API groups (a Secret beside a FineTuneJob) are skipped: the API server
    validates those with its built-in schemas.
    """
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        return 0, [Error("", f"not valid YAML: {exc}", file=file, line=mark.line + 1 if mark else None)]
    checked = 0
    errors: list[Error] = []
    for index, (node, doc) in enumerate(zip(nodes, docs, strict=True)):
        if doc is None:
            continue
        if isinstance(doc, dict) and str(doc.get("apiVersion", "")).split("/")[0] != API_VERSION.split("/")[0]:
            continue
        checked += 1
        for err in validate_manifest(doc, old=old):
            errors.append(replace(err, file=file, document=index, line=_line_of(node, err.path)))
    return checked, errors


def manifest_files(paths: Iterable[str | Path]) -> list[Path]:
    """The manifest files named by ``paths`` (folders are searched recursively), sorted."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file())
        elif path.exists():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return out


def validate_paths(paths: Iterable[str | Path], old: Any = None) -> tuple[int, list[Error]]:
    """Validate every kubetune document in the files and folders given: (documents, errors)."""
    checked = 0
    errors: list[Error] = []
    for path in manifest_files(paths):
        count, errs = validate_text(path.read_text(), file=str(path), old=old)
        checked += count
        errors += errs
    return checked, errors
