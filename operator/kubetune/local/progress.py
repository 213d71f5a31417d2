"""Progress display of the local runtime: bars for FineTuneJobs, lines for ModelDeployments.

The figures come from the status the trainer reports (``status.progress`` and
``status.metrics``, merged from its ``KUBETUNE_REPORT=file://`` fragment), so what the bar shows
is exactly what ``kubectl get ftj -o yaml`` would show in a cluster. On a terminal the bars
redraw in place; otherwise (CI logs, pipes) a line is printed only when something visible
changed, so logs stay short.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any, TextIO

from kubetune.local.store import Store

BAR_WIDTH = 24


def _fmt_seconds(seconds: float | int | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """A text progress bar, ``[#####.....]``."""
    fraction = min(max(fraction, 0.0), 1.0)
    full = int(round(fraction * width))
    return "[" + "#" * full + "." * (width - full) + "]"


def job_line(obj: dict[str, Any]) -> str:
    """One line for a FineTuneJob: phase, bar, step, loss, eval accuracy, ETA."""
    name = obj["metadata"]["name"]
    status = obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    progress = status.get("progress") or {}
    metrics = status.get("metrics") or {}
    step = progress.get("step") or 0
    total = progress.get("totalSteps")
    parts = [f"ftj/{name:<16} {phase:<10}"]
    if total:
        parts.append(f"{bar(step / total)} step {step}/{total}")
    elif phase == "Validating":
        parts.append("validating data")
    if metrics.get("trainLoss") is not None:
        parts.append(f"loss {metrics['trainLoss']:.3f}")
    if metrics.get("evalLoss") is not None:
        parts.append(f"eval {metrics['evalLoss']:.3f}")
    if metrics.get("evalAccuracy") is not None:
        parts.append(f"acc {metrics['evalAccuracy']:.0%}")
    if phase == "Running":
        parts.append(f"ETA {_fmt_seconds(progress.get('etaSeconds'))}")
    if status.get("restarts"):
        parts.append(f"restarts {status['restarts']}")
    if phase in ("Failed",) and status.get("message"):
        parts.append(status["message"][:120])
    return "  ".join(parts)


def deployment_line(obj: dict[str, Any]) -> str:
    """One line for a ModelDeployment: phase, revisions, weights, latest analysis."""
    name = obj["metadata"]["name"]
    status = obj.get("status") or {}
    phase = status.get("phase") or "Pending"
    stable = (status.get("stable") or {}).get("name") or "-"
    canary = (status.get("canary") or {}).get("name")
    weights = status.get("weights") or {}
    parts = [f"mdep/{name:<15} {phase:<11} stable {stable}"]
    if canary:
        parts.append(f"canary {canary} @ {weights.get('canary', 0)}%")
        if status.get("currentStepIndex") is not None:
            parts.append(f"step {status['currentStepIndex']}")
    analysis = status.get("analysis") or []
    if canary:
        # Only the current canary's intervals: an older canary's verdict says nothing about it.
        analysis = [a for a in analysis if a.get("revision") in (None, canary)]
    if analysis:
        last = analysis[-1]
        parts.append(f"analysis {last.get('phase')} ({last.get('samples', 0)} samples)")
    if phase in ("RolledBack", "Degraded", "Pending") and status.get("message"):
        parts.append(status["message"][:140])
    return "  ".join(parts)


class ProgressPrinter:
    """Prints the lines of every object; redraws in place on a terminal."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = bool(getattr(self.out, "isatty", lambda: False)())
        self._last: dict[str, str] = {}
        self._drawn = 0

    def _key_line(self, line: str) -> str:
        # Outside a terminal, ETA and throughput changes alone are not worth a new log line.
        return line.split("  ETA")[0]

    def update(self, lines: dict[str, str]) -> None:
        """Show the current line of each object (key: kind/name)."""
        if self.tty:
            if self._drawn:
                self.out.write(f"\x1b[{self._drawn}F")
            # A line that wraps would break the cursor arithmetic: cut it at the terminal width.
            width = max(20, shutil.get_terminal_size().columns - 1)
            for line in lines.values():
                self.out.write("\x1b[2K" + line[:width] + "\n")
            if self._drawn > len(lines):
                # An object went away: clear the lines it leaves below.
                self.out.write("\x1b[J")
            self._drawn = len(lines)
            self.out.flush()
            return
        for key, line in lines.items():
            if self._key_line(self._last.get(key, "")) != self._key_line(line):
                self.out.write(line + "\n")
                self._last[key] = line
        self.out.flush()

    def message(self, text: str) -> None:
        """A line that stays (above the bars on a terminal)."""
        if self.tty and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.out.write(text + "\n")
        self.out.flush()


def progress_lines(store: Store) -> dict[str, str]:
    """The current display line of every FineTuneJob and ModelDeployment."""
    lines = {f"ftj/{o['metadata']['name']}": job_line(o) for o in store.list("FineTuneJob")}
    lines.update(
        {f"mdep/{o['metadata']['name']}": deployment_line(o) for o in store.list("ModelDeployment")}
    )
    return lines
