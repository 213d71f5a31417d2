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

No packed example attends to another (:func:`collate`, docs/training.md): the attention of a
packed micro-batch is either a block-diagonal causal mask (``BLOCK``: a 4-D boolean mask, for
SDPA and eager attention) or, for flash-attention's variable-length kernel (``VARLEN``), the rows
flattened into one row without padding whose restarting ``position_ids`` give transformers the
sequence boundaries (cu_seqlens). Either way the loss of a packed batch is the sum of the losses
of its examples run one by one (tests/unit/test_trainer_packing.py).
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


BLOCK = "block"
VARLEN = "varlen"


def segments(position_ids: list[int]) -> list[int]:
    """The example index of every token of a row: a new example starts where positions restart."""
    out, seg = [], -1
    for i, p in enumerate(position_ids):
        if i == 0 or p != position_ids[i - 1] + 1:
            seg += 1
        out.append(seg)
    return out


def is_packed(row: Row) -> bool:
    """Whether a row holds more than one example."""
    return any(p == 0 for p in row.position_ids[1:])


def collate(rows: list[Row], pad_id: int, packed_attention: str = BLOCK):
    """Tensors for one micro-batch: input_ids, attention_mask, position_ids, labels.

    Rows of one example each get a 2-D padding mask (right padding). When a row holds several
    examples, ``packed_attention`` says how they are kept apart: ``BLOCK`` gives a 4-D boolean
    mask ``(batch, 1, width, width)``, True where query i may attend key j: j <= i in the same
    example; ``VARLEN`` flattens the micro-batch into one unpadded row and leaves the mask out.
    """
    if any(is_packed(r) for r in rows):
        if packed_attention == VARLEN:
            return _flattened(rows)
        if packed_attention != BLOCK:
            raise ValueError(f"packed_attention {packed_attention!r}: expected {BLOCK} or {VARLEN}")
    batch = _padded(rows, pad_id)
    if any(is_packed(r) for r in rows):
        batch["attention_mask"] = block_causal_mask(rows, batch["input_ids"].shape[1])
    return batch


def block_causal_mask(rows: list[Row], width: int):
    """``(batch, 1, width, width)`` booleans: causal attention within each example only.

    NB: a padding position attends to the row's first token only (never to itself, so the mask's
    diagonal counts the real tokens): a query with no key at all would make SDPA return NaN,
    and padding outputs carry no label, so what they see does not matter.
    """
    import torch

    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        seg[i, : len(r.input_ids)] = torch.tensor(segments(r.position_ids))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]
    mask = same & causal & (seg[:, :, None] >= 0)
    mask[:, :, 0] |= seg < 0  # padding queries look at token 0
    return mask[:, None, :, :]


def real_tokens(batch) -> int:
    """Non-padding tokens of a collated micro-batch (any of the three mask forms)."""
    mask = batch.get("attention_mask")
    if mask is None:  # VARLEN: one row, no padding
        return int(batch["input_ids"].numel())
    if mask.ndim == 4:
        return int(mask[:, 0].diagonal(dim1=-2, dim2=-1).sum())
    return int(mask.sum())


def _flattened(rows: list[Row]):
    """VARLEN: every row's examples end to end in one row; each row's first label is masked."""
    import torch

    ids, labels, pos = [], [], []
    for r in rows:
        row_labels = list(r.labels)
        if ids and row_labels:
            row_labels[0] = IGNORE  # not predicted from the previous row's last token
        ids += r.input_ids
        labels += row_labels
        pos += r.position_ids
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "position_ids": torch.tensor([pos], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
    }


def _padded(rows: list[Row], pad_id: int):
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
