"""Platform-owned checkpoints (DESIGN.md, "Checkpoint contract").

``<output>/checkpoints/step-<N>/`` holds::

    weights.safetensors     trainable parameters (the LoRA matrices, or every weight for full)
    optimizer.pt            optimizer state
    scheduler.pt            learning-rate scheduler state (and the fp16 grad scaler's, if any)
    rng.pt                  python / torch / CUDA RNG states
    trainer_state.json      step, data position (micro-batch index), eval history, early stopping
    manifest.json           sha256 of every file above + step + metrics -- written LAST

The training loop only takes a snapshot (CPU copies of the trainable weights, optimizer and
scheduler state, RNG); one background thread serialises it to a local staging folder, computes
the manifest there and uploads the folder (``Store.upload_dir`` puts ``manifest.json`` last)
while training goes on. At most one checkpoint is in flight: the next save waits for the
previous one, so a slow store slows training rather than piling up copies in memory or on local
disk. A failure is raised at the next save or at the end.

A sharded run (``distributed.strategy: fsdp``) writes one checkpoint from every process: each
stages and uploads the files it wrote (its shard of weights and optimizer state), hashes them
where they are, and sends the hashes to rank 0, which writes ``manifest.json`` once every
process has uploaded -- still last, still the only proof of completeness (``Peers``).

Resume takes the newest checkpoint whose manifest verifies (every file's size and sha256); one
without a manifest (a crash mid-upload) or with a mismatching file is skipped with a warning.
Retention keeps the last ``keepLast`` complete checkpoints plus, with ``keepBest``, the one with
the lowest eval loss; deleting removes ``manifest.json`` first so that a half-deleted folder is
never taken for a complete one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kubetune.api.times import now_rfc3339
from kubetune.storage import Store
from kubetune.storage.manifests import (
    MANIFEST_NAME,
    ManifestError,
    build_manifest,
    canonical_json,
    load_manifest,
    manifest_of,
    verify_dir,
)

log = logging.getLogger("kubetune_trainer.checkpoints")

PREFIX = "checkpoints"
STEP_RE = re.compile(rf"^{PREFIX}/step-(\d+)/")


def step_prefix(step: int) -> str:
    """Store prefix of a checkpoint."""
    return f"{PREFIX}/step-{step}"


class Peers(Protocol):
    """The processes that write one checkpoint together; rank 0 completes it."""

    rank: int

    def barrier(self) -> None:
        """Every writer meets here."""

    def gather(self, obj: Any) -> list[Any] | None:
        """Every writer's ``obj`` on rank 0 (in rank order), None elsewhere."""


class Alone:
    """One writer: a single process, or rank 0 writing for all (ddp: the weights are replicated)."""

    rank = 0

    def barrier(self) -> None:
        """Nobody to wait for."""

    def gather(self, obj: Any) -> list[Any]:
        """Just this writer's."""
        return [obj]


@dataclass
class Complete:
    """A checkpoint whose manifest exists (verified on resume)."""

    step: int
    manifest: dict[str, Any]

    @property
    def eval_loss(self) -> float | None:
        """Eval loss recorded at that step, if an evaluation ran there."""
        return (self.manifest.get("metrics") or {}).get("evalLoss")


class CheckpointManager:
    """Saves, uploads, lists, prunes and restores checkpoints of one job."""

    def __init__(
        self,
        store: Store,
        work_dir: Path,
        keep_last: int,
        keep_best: bool,
        on_saved: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.store = store
        self.staging = work_dir / "checkpoint-staging"
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.on_saved = on_saved
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetune-ckpt")
        self._pending: Future | None = None
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []
        self.upload_seconds: list[float] = []

    # --- listing ------------------------------------------------------------------------

    def steps_present(self) -> list[int]:
        """Every step with any object under checkpoints/, complete or not (ascending)."""
        steps = {int(m.group(1)) for k in self.store.list(f"{PREFIX}/") if (m := STEP_RE.match(k))}
        return sorted(steps)

    def complete(self) -> list[Complete]:
        """Checkpoints that have a manifest (ascending by step); incomplete ones are logged."""
        out = []
        for step in self.steps_present():
            try:
                manifest = load_manifest(self.store, step_prefix(step))
            except ManifestError as exc:
                log.warning("checkpoint step-%d has an unreadable manifest, ignored: %s", step, exc)
                continue
            if manifest is None:
                log.warning("checkpoint step-%d has no manifest.json (incomplete), ignored", step)
                continue
            out.append(Complete(step, manifest))
        return out

    # --- resume -------------------------------------------------------------------------

    def latest_verified(self, download_to: Path) -> tuple[Complete, Path] | None:
        """The newest checkpoint whose files verify, as a local folder; None when there is none."""
        for ckpt in reversed(self.complete()):
            try:
                return ckpt, self.fetch(ckpt.step, download_to)
            except ManifestError as exc:
                log.warning(
                    "checkpoint step-%d does not verify, trying an older one: %s", ckpt.step, exc
                )
        return None

    def fetch(self, step: int, download_to: Path) -> Path:
        """A verified local folder of checkpoint ``step`` (in place for file://); ManifestError if it fails."""
        prefix = step_prefix(step)
        local = self.local_path(step, download_to)
        if self._local_folder(prefix) is None:
            shutil.rmtree(local, ignore_errors=True)
            self.store.download_dir(prefix, local)
        verify_dir(local)
        return local

    def local_path(self, step: int, download_to: Path) -> Path:
        """Where :meth:`fetch` puts checkpoint ``step`` (the store's own folder for file://)."""
        return self._local_folder(step_prefix(step)) or download_to / f"step-{step}"

    def _local_folder(self, prefix: str) -> Path | None:
        root = getattr(self.store, "root", None)
        return Path(root) / prefix if root is not None else None

    # --- saving -------------------------------------------------------------------------

    def save(
        self,
        step: int,
        write_files: Callable[[Path], None],
        extra: dict[str, Any],
        *,
        wait: bool = False,
        peers: Peers | None = None,
    ) -> None:
        """Serialise (``write_files(folder)``), hash and upload a checkpoint in the background.

        ``write_files`` must only touch a snapshot of the training state (CPU copies taken by
        the caller), since training goes on while it runs. With ``peers`` every process calls
        this for the same step with its own files (a sharded checkpoint).
        """
        self.wait()  # one checkpoint in flight (and surface the previous one's failure now)
        self._pending = self._pool.submit(
            self._write_and_upload, step, write_files, extra, peers or Alone()
        )
        if wait:
            self.wait()

    def _write_and_upload(
        self, step: int, write_files: Callable[[Path], None], extra: dict[str, Any], peers: Peers
    ) -> None:
        started = time.perf_counter()
        folder = self.staging / f"step-{step}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        write_files(folder)
        files = build_manifest(folder)["files"]
        prefix = step_prefix(step)
        if peers.rank == 0:
            # A folder of the same step can only be a leftover of a crashed upload (or an older
            # run's): clear it, manifest first, so that no stale file is mixed in.
            self.store.delete(f"{prefix}/{MANIFEST_NAME}")
            self.store.delete_prefix(f"{prefix}/")
        peers.barrier()  # NB: nobody uploads into the folder while rank 0 still clears it
        self.store.upload_dir(folder, prefix)
        shutil.rmtree(folder, ignore_errors=True)
        gathered = peers.gather(files)
        if gathered is None:
            return  # rank 0 completes the checkpoint
        entries = (
            gathered[0]
            if len(gathered) == 1
            else sorted((f for part in gathered for f in part), key=lambda f: f["path"])
        )
        manifest = manifest_of(entries, {"kind": "checkpoint", "step": step, **extra})
        # Every process' files have landed (gather returned): the manifest goes last.
        self.store.write_bytes(f"{prefix}/{MANIFEST_NAME}", canonical_json(manifest))
        self.upload_seconds.append(time.perf_counter() - started)
        record = {
            "step": step,
            "uri": self.store.uri_for(prefix),
            "time": now_rfc3339(),
        }
        loss = (manifest.get("metrics") or {}).get("evalLoss")
        if loss is not None:
            record["evalLoss"] = loss
        self.prune()
        with self._lock:
            kept = {c.step for c in self.complete()}
            self.records = [r for r in self.records if r["step"] in kept and r["step"] != step] + [
                record
            ]
        log.info(
            "checkpoint step-%d complete at %s (%.2fs upload)",
            step,
            record["uri"],
            self.upload_seconds[-1],
        )
        if self.on_saved is not None:
            self.on_saved(record)

    def wait(self) -> None:
        """Block until the in-flight upload is done; re-raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last upload and stop the upload thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    # --- retention ----------------------------------------------------------------------

    def prune(self) -> list[int]:
        """Delete complete checkpoints beyond keepLast (+ best) and stale incomplete ones."""
        complete = self.complete()
        if not complete:
            return []
        keep = {c.step for c in complete[-self.keep_last :]}
        if self.keep_best:
            scored = [c for c in complete if c.eval_loss is not None]
            if scored:
                keep.add(min(scored, key=lambda c: (c.eval_loss, -c.step)).step)
        newest = complete[-1].step
        complete_steps = {c.step for c in complete}
        doomed = [
            s for s in self.steps_present() if s not in keep and (s in complete_steps or s < newest)
        ]
        for step in doomed:
            prefix = step_prefix(step)
            self.store.delete(f"{prefix}/{MANIFEST_NAME}")
            self.store.delete_prefix(f"{prefix}/")
        if doomed:
            log.info("pruned checkpoints %s (kept %s)", doomed, sorted(keep))
        return doomed


def read_state(folder: Path) -> dict[str, Any]:
    """The trainer_state.json of a local checkpoint folder."""
    return json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
