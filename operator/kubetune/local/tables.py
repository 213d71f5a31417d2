"""``kubectl get``-shaped tables of local objects, from the CRDs' own printer columns.

The columns are not re-declared here: they are read from ``additionalPrinterColumns`` of the
generated CRDs (``kubetune.api.crds``), so ``kubetune local status`` shows exactly the columns
``kubectl get ftj`` / ``kubectl get mdep`` show against a cluster (``-o wide`` adds the
priority-1 columns, as kubectl does).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kubetune.api.crds import all_crds


def printer_columns(kind: str) -> list[dict[str, Any]]:
    """The CRD's ``additionalPrinterColumns`` of the served version of ``kind``."""
    for crd in all_crds().values():
        if crd["spec"]["names"]["kind"] == kind:
            version = next(v for v in crd["spec"]["versions"] if v.get("served", True))
            return list(version.get("additionalPrinterColumns") or [])
    raise KeyError(f"no CRD for kind {kind!r}")


def json_path(obj: Any, path: str) -> Any:
    """Evaluate the simple JSONPath of a printer column (``.status.stable.name``)."""
    value = obj
    for part in path.strip(".").split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def age(timestamp: str | None, now: datetime | None = None) -> str:
    """kubectl's short age: 45s, 3m12s, 5h, 2d."""
    if not timestamp:
        return "<unknown>"
    then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int(((now or datetime.now(UTC)) - then).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 600:
        return f"{seconds // 60}m{seconds % 60}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _cell(value: Any, type_: str) -> str:
    if value is None:
        return ""
    if type_ == "date":
        return age(str(value))
    if type_ == "number" and isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(kind: str, objects: list[dict[str, Any]], wide: bool = False) -> str:
    """The ``kubectl get`` table of ``objects`` (all of one kind)."""
    columns = [c for c in printer_columns(kind) if wide or not c.get("priority")]
    rows = [["NAME", *(c["name"].upper() for c in columns)]]
    for obj in objects:
        rows.append(
            [
                obj["metadata"]["name"],
                *(_cell(json_path(obj, c["jsonPath"]), c["type"]) for c in columns),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
