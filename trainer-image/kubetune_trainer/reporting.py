"""Progress reports (trainer -> FineTuneJob status) and the termination message.

Progress (docs/contracts.md, "Progress reports"): a JSON merge patch of the trainer-owned status
fields, named as in ``FineTuneJobStatus`` (``progress``, ``metrics``, ``checkpoints`` -- the last
5 -- and ``resumedFromStep``). Channels, chosen by ``KUBETUNE_REPORT``:

- ``k8s``: :class:`kubetune.k8s.progress.StatusPatcher` with the pod's ServiceAccount;
- ``file:///path.json``: the merged status fragment rewritten atomically (tmp + rename), read by
  the local runtime;
- ``none``: nothing.

Every channel sits behind :class:`BackgroundReporter`: the training loop hands over a fragment
and never waits on the network; fragments are merged and only the newest state is sent, at
most every ``min_interval`` seconds unless a report is marked urgent (checkpoint, eval, end).
A failing channel is logged, never fatal: progress is a convenience, the checkpoint is the truth.

The termination message (``KUBETUNE_TERMINATION_LOG``, default ``/dev/termination-log``) is a
JSON object of at most 4 KiB: ``outcome``, ``message``, ``step``, ``metrics``, ``dataReport``,
``artifact``. Kubernetes keeps it in the pod status after the container exits, so the operator
learns why a run ended even when the progress channel was down.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger("kubetune_trainer.reporting")

TERMINATION_LIMIT = 4096
MAX_CHECKPOINTS_REPORTED = 5


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 merge of ``patch`` into a copy of ``target`` (None deletes a key)."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out


def atomic_write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary sibling and a rename (readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(value, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FileChannel:
    """Keeps the merged status fragment in one JSON file (the local runtime reads it)."""

    def __init__(self, path: Path):
        self.path = path
        self.state: dict[str, Any] = {}

    def send(self, fragment: dict[str, Any]) -> None:
        """Merge and rewrite the whole fragment atomically."""
        self.state = merge_patch(self.state, fragment)
        atomic_write_json(self.path, self.state)


class K8sChannel:
    """Merge-patches the own FineTuneJob's status through the in-cluster API."""

    def __init__(self, namespace: str, name: str):
        from kubetune.k8s.progress import StatusPatcher

        self.patcher = StatusPatcher.in_cluster(namespace, name)

    def send(self, fragment: dict[str, Any]) -> None:
        """One PATCH to .../finetunejobs/<name>/status."""
        self.patcher.patch(fragment)


class BackgroundReporter:
    """Coalesces fragments and sends them from a daemon thread (see the module docstring)."""

    def __init__(self, channel: Any | None, min_interval: float = 2.0):
        self.channel = channel
        self.min_interval = min_interval
        self._pending: dict[str, Any] = {}
        self._urgent = False
        self._cond = threading.Condition()
        self._closed = False
        self._last_sent = 0.0
        self.failures = 0
        self._thread = None
        if channel is not None:
            self._thread = threading.Thread(target=self._run, name="kubetune-report", daemon=True)
            self._thread.start()

    def report(self, fragment: dict[str, Any], urgent: bool = False) -> None:
        """Queue a fragment (merged with anything not sent yet); never blocks on I/O."""
        if self.channel is None:
            return
        with self._cond:
            self._pending = merge_patch(self._pending, fragment)
            self._urgent = self._urgent or urgent
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending:
                    self._cond.wait()
                if not self._pending and self._closed:
                    return
                wait = self.min_interval - (time.monotonic() - self._last_sent)
                if wait > 0 and not self._urgent and not self._closed:
                    self._cond.wait(wait)
                    continue
                fragment, self._pending, self._urgent = self._pending, {}, False
            self._send(fragment)

    def _send(self, fragment: dict[str, Any]) -> None:
        try:
            self.channel.send(fragment)
        except Exception as exc:  # noqa: BLE001 (progress is best-effort; the reason is logged)
            self.failures += 1
            log.warning("progress report failed (%s); training continues", exc)
        self._last_sent = time.monotonic()

    def close(self, timeout: float = 10.0) -> None:
        """Send what is pending and stop the thread (waits at most ``timeout`` seconds)."""
        if self._thread is None:
            return
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)


def make_reporter(
    report: str, namespace: str, name: str, min_interval: float = 2.0
) -> BackgroundReporter:
    """The reporter for a ``KUBETUNE_REPORT`` value (k8s, file:///path.json or none)."""
    if report == "none":
        return BackgroundReporter(None)
    if report == "k8s":
        try:
            return BackgroundReporter(K8sChannel(namespace, name), min_interval)
        except Exception as exc:  # noqa: BLE001 (no cluster env: report nothing, but say so)
            log.warning("KUBETUNE_REPORT=k8s but %s; progress will not be reported", exc)
            return BackgroundReporter(None)
    parsed = urlparse(report)
    if parsed.scheme != "file":
        raise ValueError(f"KUBETUNE_REPORT={report!r}: expected k8s, none or file:///path.json")
    return BackgroundReporter(FileChannel(Path(parsed.path)), min_interval)


def termination_message(
    outcome: str,
    message: str,
    *,
    step: int | None = None,
    metrics: dict[str, Any] | None = None,
    data_report: dict[str, Any] | None = None,
    artifact: dict[str, Any] | None = None,
    memory_estimate: dict[str, Any] | None = None,
) -> str:
    """The termination JSON, shortened to fit Kubernetes' 4 KiB limit.

    What to drop first when it is too long: the message's tail, then the PII counts, then the
    whole data report; outcome, step, metrics and the artifact always fit.
    """
    body: dict[str, Any] = {"outcome": outcome, "message": message}
    if step is not None:
        body["step"] = step
    if metrics:
        body["metrics"] = {k: v for k, v in metrics.items() if v is not None}
    if data_report:
        body["dataReport"] = data_report
    if artifact:
        body["artifact"] = artifact
    if memory_estimate:
        body["memoryEstimate"] = memory_estimate
    text = json.dumps(body, separators=(",", ":"))
    if len(text.encode()) <= TERMINATION_LIMIT:
        return text
    overflow = len(text.encode()) - TERMINATION_LIMIT
    if len(message) > 200:
        keep = max(200, len(message) - overflow - 20)
        body["message"] = message[:keep] + " [...]"
    text = json.dumps(body, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT and "dataReport" in body:
        body["dataReport"] = {k: v for k, v in body["dataReport"].items() if k != "piiMasked"}
        text = json.dumps(body, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT:
        body.pop("dataReport", None)
        body["message"] = body["message"][:1000]
        text = json.dumps(body, separators=(",", ":"))
    return text


def write_termination(path: str, text: str) -> None:
    """Write the termination message; a missing /dev/termination-log (outside k8s) is fine."""
    try:
        target = Path(path)
        if target.parent.exists() or str(target).startswith("/dev/"):
            target.write_text(text, encoding="utf-8")
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", path, exc)
