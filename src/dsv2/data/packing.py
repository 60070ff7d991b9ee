"""Packed rows: several documents in one fixed-length row, kept apart by segment ids.

An example is (input_ids, targets) of equal length, the targets already shifted inside
the example (targets[j] is the token input j predicts, IGNORE_INDEX where nothing is
scored, and always at the example's last position: nothing of this example follows it).
So the first token of an example is never a target, and no example predicts another's.

`pack` places examples into rows of `seq_len` tokens best-fit-decreasing: longest first,
each into the row with the least room that still fits it, else a new row. A row's
segment ids number its examples 0, 1, 2, ...; the padding at its end is segment -1. The
model turns segment ids into positions that restart at 0 per example (RoPE included) and
a block-diagonal causal mask (model/mask.py), so a packed row computes what the
examples would alone. `pack(..., packing=False)` puts each example in its own row (the
padded baseline the benchmark compares against).

An example longer than seq_len is truncated to its first seq_len tokens or dropped, as
`overlong` says; both are counted. SFT (align/sft.py) and long-context training pack
through this one mechanism.

`PackedLoader` serves the rows like `TokenLoader` serves windows: a seeded order per
epoch, data-parallel ranks taking every R-th row, and a state of (epoch, cursor) that
resumes on exactly the next row.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch

from ..model.loss import IGNORE_INDEX
from .loader import Batch, EpochOrder

OVERLONG = ("truncate", "drop")


@dataclass
class Packed:
    """Rows [R, seq_len] of input ids, targets and segment ids, and what packing did."""
    input_ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    examples: int = 0                 # examples placed
    truncated: int = 0                # examples cut to seq_len
    dropped: list[int] = field(default_factory=list)   # indices of examples left out

    @property
    def rows(self) -> int:
        return len(self.input_ids)

    @property
    def padding_fraction(self) -> float:
        return float((self.segment_ids < 0).mean()) if self.rows else 0.0


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, overlong: str = "truncate",
         packing: bool = True, pad_id: int = 0) -> Packed:
    """Examples (input_ids, targets) -> rows of seq_len tokens (see the module docstring)."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong={overlong!r}: use 'truncate' (keep the first seq_len tokens) or 'drop'.")
    keep, truncated, dropped = [], 0, []
    for i, (ids, tgt) in enumerate(examples):
        if len(ids) != len(tgt):
            raise ValueError(f"example {i}: {len(ids)} input ids but {len(tgt)} targets; they pair one to one.")
        if len(ids) > seq_len:
            if overlong == "drop":
                dropped.append(i)
                continue
            ids, tgt = ids[:seq_len], list(tgt[:seq_len - 1]) + [IGNORE_INDEX]
            truncated += 1
        if not ids or all(t == IGNORE_INDEX for t in tgt):
            dropped.append(i)         # nothing left to learn from (empty, or cut before any target)
            continue
        keep.append((ids, tgt))
    bins = best_fit_decreasing([len(ids) for ids, _ in keep], seq_len) if packing else [[i] for i in range(len(keep))]
    R = len(bins)
    out = Packed(np.full((R, seq_len), pad_id, dtype=np.int64), np.full((R, seq_len), IGNORE_INDEX, dtype=np.int64),
                 np.full((R, seq_len), -1, dtype=np.int64), len(keep), truncated, dropped)
    for r, members in enumerate(bins):
        at = 0
        for seg, i in enumerate(members):
            ids, tgt = keep[i]
            out.input_ids[r, at:at + len(ids)] = ids
            out.targets[r, at:at + len(ids)] = tgt
            out.segment_ids[r, at:at + len(ids)] = seg
            at += len(ids)
    return out


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of indices into `lengths`) of total length <= capacity, best-fit-decreasing.

    Ties in length keep index order, so the result is a pure function of the lengths. Rows
    are found by their free room: `free` is the sorted list of distinct room values in use
    (at most capacity + 1 of them), `rows_with[room]` the rows that have it."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    free: list[int] = []
    rows_with: dict[int, list[int]] = {}
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a row of {capacity}; truncate or drop it first.")
        k = bisect.bisect_left(free, n)
        if k < len(free):             # the fullest row it fits in
            r = rows_with[free[k]].pop()
            if not rows_with[free[k]]:
                del rows_with[free[k]]
                free.pop(k)
        else:
            r = len(bins)
            bins.append([])
            room.append(capacity)
        bins[r].append(i)
        room[r] -= n
        if room[r] > 0:
            if room[r] not in rows_with:
                bisect.insort(free, room[r])
                rows_with[room[r]] = []
            rows_with[room[r]].append(r)
    return bins


class PackedLoader:
    """Micro-batches of packed rows in a seeded order, resumable at the exact next row."""

    def __init__(self, packed: Packed, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        if packed.rows < dp_size:
            raise ValueError(f"{packed.rows} rows of data are fewer than the {dp_size} data-parallel ranks: "
                             "add examples or use fewer processes.")
        self.packed = packed
        self.order = EpochOrder(packed.rows, seed, dp_rank, dp_size)

    @property
    def rows(self) -> int:
        return self.packed.rows

    def batch(self, rows: np.ndarray) -> Batch:
        """The given rows, cut after the last column that holds a token of any of them."""
        p = self.packed
        seg = p.segment_ids[rows]
        used = int(np.nonzero((seg >= 0).any(0))[0].max()) + 1 if (seg >= 0).any() else 1
        return Batch(torch.from_numpy(p.input_ids[rows, :used]), torch.from_numpy(p.targets[rows, :used]),
                     torch.from_numpy(seg[:, :used].copy()))

    def next_batch(self, n: int) -> tuple[Batch, torch.Tensor]:
        """-> n rows as a Batch and a unique sample id per row (epoch * R + row)."""
        picks = [self.order.next() for _ in range(n)]
        return self.batch(np.array([r for r, _ in picks])), torch.tensor([i for _, i in picks], dtype=torch.int64)

    def fixed_batches(self, batch: int):
        """Every row once, in order (validation)."""
        for s in range(0, self.rows, batch):
            yield self.batch(np.arange(s, min(s + batch, self.rows)))

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "rows": self.rows}

    def load_state_dict(self, sd: dict) -> None:
        self.order.load_state_dict(sd, rows=self.rows)
