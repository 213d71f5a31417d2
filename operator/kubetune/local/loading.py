"""Read manifests for ``kubetune local apply -f``: files or folders of YAML/JSON, validated.

The same pydantic models that generate the CRDs parse each manifest, so a misspelt field or a
bad value fails here with the file, the document and the field path, exactly where a cluster's
API server would refuse it (instead of silently pruning it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kubetune.api import FineTuneJob, ModelDeployment

_MODELS = {"FineTuneJob": FineTuneJob, "ModelDeployment": ModelDeployment}
_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(ValueError):
    """A manifest cannot be applied; the message names the file, document and field."""


def manifest_files(path: Path) -> list[Path]:
    """The files ``-f`` names: the file itself, or a folder's YAML/JSON files in name order."""
    if not path.exists():
        raise ManifestError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES and p.is_file())
        if not files:
            raise ManifestError(f"{path}: folder has no .yaml, .yml or .json files")
        return files
    return [path]


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {loc}: {err['msg']}")
    return "\n".join(lines)


def validate_manifest(doc: dict[str, Any], where: str) -> dict[str, Any]:
    """Check one manifest against the API models; returns it unchanged (the wire form)."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: expected a mapping, got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind == "Secret":
        if doc.get("apiVersion") != "v1" or not (doc.get("metadata") or {}).get("name"):
            raise ManifestError(f"{where}: a Secret needs apiVersion v1 and metadata.name")
        return doc
    model = _MODELS.get(kind)  # type: ignore[arg-type]
    if model is None:
        raise ManifestError(
            f"{where}: kind {kind!r} is not handled by the local runtime (FineTuneJob, ModelDeployment, Secret)"
        )
    try:
        parsed = model.model_validate(doc)
    except ValidationError as exc:
        name = (doc.get("metadata") or {}).get("name", "?")
        raise ManifestError(
            f"{where}: {kind} {name!r} is invalid:\n{_format_errors(exc)}"
        ) from None
    if isinstance(parsed, ModelDeployment) and parsed.spec.server.engine != "builtin":
        # The local runtime runs container commands as local processes and has no init
        # containers, GPUs or vLLM image: refuse here rather than crash-loop on `vllm serve`.
        raise ManifestError(
            f"{where}: ModelDeployment {parsed.metadata.name!r}: spec.server.engine "
            f"{parsed.spec.server.engine!r} runs in a cluster only (vLLM needs CUDA GPUs and its "
            "image); the local runtime serves with engine builtin"
        )
    return doc


def load_manifests(path: str | Path) -> list[dict[str, Any]]:
    """Every manifest under ``path``, validated; Secrets first, then in file order."""
    docs: list[dict[str, Any]] = []
    for file in manifest_files(Path(path)):
        try:
            loaded = list(yaml.safe_load_all(file.read_text()))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{file}: not valid YAML: {exc}") from None
        for index, doc in enumerate(loaded):
            if doc is None:
                continue
            docs.append(validate_manifest(doc, f"{file} (document {index + 1})"))
    # Secrets first: a Job's secretKeyRef must resolve when its process starts.
    return sorted(docs, key=lambda d: d.get("kind") != "Secret")
