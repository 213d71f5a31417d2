"""The local state store: objects and their status under ``.kubetune/``, shaped as in a cluster.

Layout (one JSON file per object, written atomically with tmp + rename so a reader such as
``kubetune local status`` in another terminal never sees half a file)::

    .kubetune/
      objects/<plural>/<name>.json     apiVersion, kind, metadata, spec, status
      children/<kind>/<name>.json      the Job / Deployment manifests the builders produced
      run/<process>/                   per-process folder: log, report, termination log, work dir
      cache/                           shared download cache (HF_HOME, KUBETUNE_CACHE_DIR)
      processes.json                   live child processes (see processes.py)
      controller.pid                   the running ``kubetune local apply`` controller

``metadata.generation`` is bumped when the spec changes and ``metadata.uid`` is assigned on
creation, as an API server would, so the same status logic (``observedGeneration``) works
unchanged. Secrets applied locally (kind Secret) are stored too, with ``stringData`` folded
into base64 ``data``, so ``secretKeyRef`` resolves exactly like in a pod.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import uuid
from pathlib import Path
from typing import Any

from kubetune.api.times import now_rfc3339

# kind -> plural (the folder name), for the kinds the local runtime accepts.
PLURALS = {
    "FineTuneJob": "finetunejobs",
    "ModelDeployment": "modeldeployments",
    "Secret": "secrets",
}
DEFAULT_NAMESPACE = "default"


def default_root() -> Path:
    """``$KUBETUNE_LOCAL_DIR`` or ``./.kubetune``."""
    return Path(os.environ.get("KUBETUNE_LOCAL_DIR") or ".kubetune").resolve()


def _atomic_write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class Store:
    """Objects of the local runtime on disk."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or default_root()).resolve()

    # --- paths ------------------------------------------------------------------------------

    def object_path(self, kind: str, name: str) -> Path:
        """File of one object."""
        if kind not in PLURALS:
            raise ValueError(
                f"the local runtime does not handle kind {kind!r} (handles {sorted(PLURALS)})"
            )
        return self.root / "objects" / PLURALS[kind] / f"{name}.json"

    def run_dir(self, process: str) -> Path:
        """Per-process folder (log, report, termination log, scratch)."""
        return self.root / "run" / process.replace("/", "_")

    @property
    def cache_dir(self) -> Path:
        """Download cache shared by every process (a node-local cache in a cluster)."""
        return self.root / "cache"

    @property
    def registry(self) -> Path:
        """The process registry file."""
        return self.root / "processes.json"

    @property
    def controller_pid_file(self) -> Path:
        """Pid of the running controller."""
        return self.root / "controller.pid"

    # --- objects ----------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        """The stored object, or None."""
        try:
            return json.loads(self.object_path(kind, name).read_text())
        except FileNotFoundError:
            return None

    def list(self, kind: str) -> list[dict[str, Any]]:
        """All stored objects of a kind, by name."""
        folder = self.root / "objects" / PLURALS[kind]
        out = []
        for path in sorted(folder.glob("*.json")):
            with contextlib.suppress(ValueError, OSError):
                out.append(json.loads(path.read_text()))
        return out

    def apply(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """Create or update an object like ``kubectl apply``; returns (object, created|configured|unchanged).

        The stored status is kept; the generation is bumped only when the spec (or, for a
        Secret, its data) changed.
        """
        kind = manifest.get("kind")
        name = (manifest.get("metadata") or {}).get("name")
        if not kind or not name:
            raise ValueError("a manifest needs kind and metadata.name")
        new = copy.deepcopy(manifest)
        new.pop("status", None)
        meta = new.setdefault("metadata", {})
        meta.setdefault("namespace", DEFAULT_NAMESPACE)
        if kind == "Secret":
            data = dict(new.get("data") or {})
            for key, value in (new.pop("stringData", None) or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            new["data"] = data
        old = self.get(kind, name)
        body_key = "data" if kind == "Secret" else "spec"
        if old is None:
            meta.update(generation=1, uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
            outcome = "created"
        else:
            old_meta = old.get("metadata", {})
            meta["uid"] = old_meta.get("uid") or str(uuid.uuid4())
            meta["creationTimestamp"] = old_meta.get("creationTimestamp") or now_rfc3339()
            changed = old.get(body_key) != new.get(body_key)
            meta["generation"] = int(old_meta.get("generation", 1)) + (1 if changed else 0)
            if "status" in old:
                new["status"] = old["status"]
            if changed:
                outcome = "configured"
            elif old.get("metadata", {}).get("annotations") != meta.get("annotations"):
                outcome = "configured"
            else:
                outcome = "unchanged"
        _atomic_write(self.object_path(kind, name), new)
        return new, outcome

    def write_status(self, kind: str, name: str, status: dict[str, Any]) -> bool:
        """Replace the status of a stored object (the /status subresource); False if unchanged.

        The spec on disk is re-read first, so a concurrent ``kubetune local apply`` is never
        overwritten by the controller.
        """
        obj = self.get(kind, name)
        if obj is None:
            return False
        if obj.get("status") == status:
            return False
        obj["status"] = status
        _atomic_write(self.object_path(kind, name), obj)
        return True

    def patch_annotations(self, kind: str, name: str, annotations: dict[str, str | None]) -> None:
        """Set (or with None remove) annotations, like ``kubectl annotate``."""
        obj = self.get(kind, name)
        if obj is None:
            raise KeyError(f"{kind} {name!r} not found in {self.root}")
        current = obj.setdefault("metadata", {}).setdefault("annotations", {})
        for key, value in annotations.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
        _atomic_write(self.object_path(kind, name), obj)

    def delete(self, kind: str, name: str) -> bool:
        """Remove an object; False when it did not exist."""
        try:
            self.object_path(kind, name).unlink()
        except FileNotFoundError:
            return False
        return True

    def secret_value(self, name: str, key: str) -> str | None:
        """A key of a locally applied Secret, decoded; None when the Secret or key is absent."""
        secret = self.get("Secret", name)
        if secret is None:
            return None
        raw = (secret.get("data") or {}).get(key)
        return None if raw is None else base64.b64decode(raw).decode()

    # --- children ---------------------------------------------------------------------------

    def record_event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """Append an Event about ``obj`` to ``events.jsonl`` (the local ``kubectl get events``)."""
        record = {
            "time": now_rfc3339(),
            "object": f"{obj['kind'].lower()}/{obj['metadata']['name']}",
            "type": type_,
            "reason": reason,
            "message": message,
        }
        with (self.root / "events.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_child(self, manifest: dict[str, Any]) -> None:
        """Keep a built child manifest (Job, Deployment, ...) for inspection and for reuse checks."""
        kind = manifest.get("kind", "Object")
        name = manifest.get("metadata", {}).get("name", "unnamed")
        _atomic_write(self.root / "children" / kind.lower() / f"{name}.json", manifest)

    def get_child(self, kind: str, name: str) -> dict[str, Any] | None:
        """A saved child manifest, or None."""
        try:
            return json.loads((self.root / "children" / kind.lower() / f"{name}.json").read_text())
        except FileNotFoundError:
            return None
