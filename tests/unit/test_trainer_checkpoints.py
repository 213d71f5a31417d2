"""Checkpoint bookkeeping of the trainer (kubetune_trainer.checkpoints) on a file:// store.

Covers: a checkpoint is listed as complete only once its manifest exists; resume picks the
newest checkpoint that verifies, skipping one without a manifest and one with a changed file;
retention keeps the last K plus the best eval loss and removes stale incomplete folders older
than the newest complete one (never a newer one: it may be in flight); a failed upload surfaces
at the next save; the progress callback sees each completed checkpoint; a sharded
checkpoint (several writers) gets one manifest over every writer's files, written by rank 0 last.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.storage import open_store
from kubetune_trainer.checkpoints import CheckpointManager


def writer(payload: bytes):
    def write(folder: Path) -> None:
        (folder / "weights.bin").write_bytes(payload)
        (folder / "sub").mkdir()
        (folder / "sub/state.json").write_text("{}")

    return write


@pytest.fixture
def manager(tmp_path):
    seen = []
    store = open_store((tmp_path / "out").as_uri())
    mgr = CheckpointManager(
        store, tmp_path / "work", keep_last=2, keep_best=True, on_saved=seen.append
    )
    mgr.seen = seen
    yield mgr
    mgr.close()


def save(mgr, step, loss=None):
    mgr.save(
        step,
        writer(f"w{step}".encode()),
        {"metrics": {"evalLoss": loss} if loss is not None else {}},
        wait=True,
    )


def test_retention_keeps_last_k_plus_best(manager, tmp_path):
    for step, loss in [(10, 0.9), (20, 0.5), (30, 0.7), (40, None), (50, 0.8)]:
        save(manager, step, loss)
    assert [c.step for c in manager.complete()] == [20, 40, 50]  # last 2 + best (0.5 at 20)
    assert sorted(p.name for p in (tmp_path / "out/checkpoints").iterdir()) == [
        "step-20",
        "step-40",
        "step-50",
    ]
    assert [r["step"] for r in manager.seen] == [10, 20, 30, 40, 50]
    assert [r["step"] for r in manager.records] == [20, 40, 50]
    assert manager.seen[1]["evalLoss"] == 0.5 and "evalLoss" not in manager.seen[3]
    assert not (tmp_path / "work/checkpoint-staging/step-50").exists()


def test_resume_skips_incomplete_and_corrupted(manager, tmp_path):
    save(manager, 5)
    save(manager, 10)
    root = tmp_path / "out/checkpoints"
    (root / "step-15").mkdir()
    (root / "step-15/weights.bin").write_bytes(b"half written")
    (root / "step-10/weights.bin").write_bytes(b"w11")  # same size, different bytes
    found = manager.latest_verified(tmp_path / "dl")
    assert found is not None
    ckpt, folder = found
    assert ckpt.step == 5 and (folder / "weights.bin").read_bytes() == b"w5"


def test_no_checkpoint_means_a_fresh_start(manager, tmp_path):
    assert manager.latest_verified(tmp_path / "dl") is None
    (tmp_path / "out/checkpoints/step-3").mkdir(parents=True)
    (tmp_path / "out/checkpoints/step-3/weights.bin").write_bytes(b"x")
    assert manager.latest_verified(tmp_path / "dl") is None


def test_stale_incomplete_folders_are_pruned_but_newer_ones_kept(manager, tmp_path):
    root = tmp_path / "out/checkpoints"
    for step in (3, 99):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}/weights.bin").write_bytes(b"x")
    save(manager, 10)
    assert sorted(p.name for p in root.iterdir()) == ["step-10", "step-99"]


def test_resave_of_a_leftover_step_replaces_it_cleanly(manager, tmp_path):
    root = tmp_path / "out/checkpoints/step-10"
    root.mkdir(parents=True)
    (root / "stale.bin").write_bytes(b"old")
    save(manager, 10)
    assert not (root / "stale.bin").exists() and (root / "manifest.json").exists()


def test_a_failed_upload_is_raised_at_the_next_save(tmp_path):
    store = open_store((tmp_path / "out").as_uri())
    mgr = CheckpointManager(store, tmp_path / "work", keep_last=2, keep_best=False)

    def broken(folder: Path) -> None:
        raise OSError("disk full")

    mgr.save(1, broken, {})
    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, writer(b"x"), {})
    mgr.close()


class ThreadPeers:
    """Two writers in one process (threads), meeting like the processes of a sharded run."""

    def __init__(self, rank, barrier, board):
        self.rank, self._barrier, self._board = rank, barrier, board

    def barrier(self):
        self._barrier.wait(timeout=30)

    def gather(self, obj):
        self._board[self.rank] = obj
        self._barrier.wait(timeout=30)
        return [self._board[r] for r in sorted(self._board)] if self.rank == 0 else None


def test_a_sharded_checkpoint_gets_one_manifest_over_every_writers_files(tmp_path):
    import threading

    from kubetune.storage.manifests import verify_prefix

    store = open_store((tmp_path / "out").as_uri())
    # A leftover of a crashed attempt at the same step must not survive into the new folder.
    store.write_bytes("checkpoints/step-4/__9_0.distcp", b"stale")
    barrier, board = threading.Barrier(2), {}
    managers = [CheckpointManager(store, tmp_path / f"rank-{r}", 2, True) for r in (0, 1)]

    def shard(rank):
        def write(folder: Path) -> None:
            (folder / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * 10)
            if rank == 0:
                (folder / ".metadata").write_bytes(b"meta")

        return write

    threads = [
        threading.Thread(
            target=managers[r].save,
            args=(4, shard(r), {"metrics": {}}),
            kwargs={"wait": True, "peers": ThreadPeers(r, barrier, board)},
        )
        for r in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    manifest = verify_prefix(store, "checkpoints/step-4")
    assert [f["path"] for f in manifest["files"]] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not store.exists("checkpoints/step-4/__9_0.distcp")
    assert [c.step for c in managers[0].complete()] == [4] and managers[0].records[0]["step"] == 4
    assert managers[1].records == []  # rank 0 completes and reports the checkpoint
    for m in managers:
        m.close()
