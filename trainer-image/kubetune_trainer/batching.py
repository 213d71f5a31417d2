"""Deterministic micro-batches: the data order is a pure function of (seed, micro-batch index).

Training consumes an endless stream of micro-batches; optimiser step ``s`` uses micro-batches
``s*accum .. s*accum+accum-1``. Micro-batch ``k`` belongs to epoch ``k // batches_per_epoch`` and
takes its slice of that epoch's permutation, which is drawn from a private ``random.Random``
seeded with ``(seed, epoch)`` -- never from the global RNGs that dropout uses. So the data
position of a checkpoint is one integer, and a resumed run sees exactly the batches the
uninterrupted run would have seen.

With packing, examples are first packed (in a seeded order, first fit in sequence) into rows of
at most ``max_len`` tokens; ``position_ids`` restart at every example and the first label of each
example is masked, so no example learns to predict its neighbour's first token. Without packing,
rows are padded to the longest row of their micro-batch (dynamic padding).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from kubetune_trainer.encoding import IGNORE, Encoded


@dataclass
class Row:
    """One training row (an example, or several packed examples)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def make_rows(examples: list[Encoded], max_len: int, packing: bool, seed: int) -> list[Row]:
    """Training rows from encoded examples (packed when ``packing``)."""
    if not packing:
        return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]
    order = list(range(len(examples)))
    random.Random(f"kubetune-pack-{seed}").shuffle(order)
    rows: list[Row] = []
    cur = Row([], [], [])
    for i in order:
        ex = examples[i]
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_len:
            rows.append(cur)
            cur = Row([], [], [])
        labels = list(ex.labels)
        if cur.input_ids and labels:
            labels[0] = IGNORE
        cur.input_ids += ex.input_ids
        cur.labels += labels
        cur.position_ids += list(range(len(ex.input_ids)))
    if cur.input_ids:
        rows.append(cur)
    return rows


class BatchPlan:
    """Maps a micro-batch index to its rows (see the module docstring)."""

    def __init__(self, n_rows: int, batch_size: int, seed: int):
        if n_rows < 1:
            raise ValueError("no training rows")
        self.n_rows = n_rows
        self.batch_size = min(batch_size, n_rows)
        self.seed = seed
        self.batches_per_epoch = math.ceil(n_rows / self.batch_size)
        self._perm_cache: dict[int, list[int]] = {}

    def permutation(self, epoch: int) -> list[int]:
        """The row order of an epoch."""
        if epoch not in self._perm_cache:
            order = list(range(self.n_rows))
            random.Random(f"kubetune-order-{self.seed}-{epoch}").shuffle(order)
            self._perm_cache = {epoch: order}
        return self._perm_cache[epoch]

    def indices(self, micro_batch: int) -> list[int]:
        """Row indices of micro-batch ``micro_batch``."""
        epoch, j = divmod(micro_batch, self.batches_per_epoch)
        return self.permutation(epoch)[j * self.batch_size : (j + 1) * self.batch_size]

    def epoch_of(self, micro_batch: int) -> float:
        """Fractional epoch reached after ``micro_batch`` micro-batches."""
        return micro_batch / self.batches_per_epoch


def collate(rows: list[Row], pad_id: int):
    """Tensors for one micro-batch: input_ids, attention_mask, position_ids, labels (right-padded)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
        pos[i, :n] = torch.tensor(r.position_ids)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}
