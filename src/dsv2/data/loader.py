"""Training batches: `Batch`, the seeded resumable order (`EpochOrder`), and fixed windows from token shards.

A split's shards are cut into non-overlapping windows of seq_len + 1 tokens (inputs and
their next-token targets); windows never cross a shard boundary. Each epoch visits every
window once in the order `randperm(W, seed + epoch)`. The loader's whole state is
(epoch, cursor): saving and restoring it resumes on exactly the next window, which is
what makes N steps straight and N/2 + resume + N/2 bit-identical.

Data parallel: rank r of R takes positions r, r + R, r + 2R, ... of the same order, so
ranks see disjoint windows and together see what one process would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.loss import IGNORE_INDEX
from .shards import read_card


@dataclass
class Batch:
    """One micro-batch as the model takes it: input_ids and targets [B, T] (the token each
    position predicts, IGNORE_INDEX where nothing is scored) and, for packed rows, segment_ids
    [B, T] (the document each token belongs to; -1 marks padding; model/mask.py)."""
    input_ids: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor | None = None

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                     None if self.segment_ids is None else self.segment_ids.to(device, non_blocking=True))

    @property
    def valid(self) -> torch.Tensor | None:
        """[B, T] bool, True on tokens that are not padding (None: no padding)."""
        return None if self.segment_ids is None else self.segment_ids >= 0

    @property
    def n_targets(self) -> int:
        """Tokens scored (the loss is normalised by these)."""
        return int((self.targets != IGNORE_INDEX).sum())

    @property
    def n_tokens(self) -> int:
        """Tokens that are not padding (what tokens/s counts)."""
        valid = self.valid
        return self.input_ids.numel() if valid is None else int(valid.sum())


class EpochOrder:
    """Which item comes next: every epoch visits all `n` items once, in `randperm(n)` seeded by
    (seed, epoch); data-parallel rank r of R takes positions r, r + R, ... of that order. The
    whole state is (epoch, cursor), which is what makes a resumed run read exactly what a
    straight run would have."""

    def __init__(self, n: int, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        self.n, self.seed, self.dp_rank, self.dp_size = n, seed, dp_rank, dp_size
        self.epoch, self.cursor = 0, 0
        self._order: torch.Tensor | None = None

    def next(self) -> tuple[int, int]:
        """-> (item index, a sample id unique across epochs: epoch * n + item)."""
        pos = self.cursor * self.dp_size + self.dp_rank
        if pos >= self.n - (self.n % self.dp_size):  # ranks stay in step
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
            pos = self.dp_rank
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            self._order = torch.randperm(self.n, generator=g)
        self.cursor += 1
        item = int(self._order[pos])
        return item, self.epoch * self.n + item

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "dp_size": self.dp_size}

    def load_state_dict(self, sd: dict, **also) -> None:
        """Restore (epoch, cursor); `also` names further values that must match (e.g. n_windows)."""
        mine = {"seed": self.seed, "dp_size": self.dp_size, **also}
        for k, v in mine.items():
            if sd[k] != v:
                raise ValueError(f"the checkpoint's data position was saved with {k}={sd[k]} but this run has "
                                 f"{k}={v}: resume with the same data and config.")
        self.epoch, self.cursor, self._order = sd["epoch"], sd["cursor"], None


class TokenLoader:
    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1):
        card = read_card(data_dir)
        if split not in card["shards"]:
            raise ValueError(f"{data_dir}/card.json has no '{split}' split (has {', '.join(card['shards'])}).")
        self.seq_len, self.seed, self.dp_rank, self.dp_size = seq_len, seed, dp_rank, dp_size
        self.vocab_size = card["vocab_size"]
        dtype = np.dtype(card["dtype"])
        self.shards = [np.memmap(Path(data_dir) / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],))
                       for s in card["shards"][split]]
        per_shard = [(len(s) - 1) // seq_len for s in self.shards]
        self.n_windows = sum(per_shard)
        if self.n_windows < dp_size:
            raise ValueError(f"the '{split}' split of {data_dir} has {sum(map(len, self.shards)):,} tokens, fewer "
                             f"than one window of {seq_len + 1} per rank: lower seq_len or add data.")
        self.starts = np.cumsum([0] + per_shard)  # first global window id of each shard
        self.order = EpochOrder(self.n_windows, seed, dp_rank, dp_size)

    # ----------------------------------------------------------------- reading
    def window(self, w: int) -> np.ndarray:
        shard = int(np.searchsorted(self.starts, w, side="right")) - 1
        off = (w - int(self.starts[shard])) * self.seq_len
        return self.shards[shard][off: off + self.seq_len + 1]

    def next_batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [n, seq_len + 1] int64 and a unique sample id per row (epoch * W + window)."""
        picks = [self.order.next() for _ in range(n)]
        rows = [self.window(w).astype(np.int64) for w, _ in picks]
        return torch.from_numpy(np.stack(rows)), torch.tensor([i for _, i in picks], dtype=torch.int64)

    def fixed_batches(self, n_batches: int, batch: int):
        """The first n_batches x batch windows in file order (validation: the same every time)."""
        total = min(n_batches * batch, self.n_windows)
        for s in range(0, total, batch):
            rows = [self.window(w).astype(np.int64) for w in range(s, min(s + batch, total))]
            yield torch.from_numpy(np.stack(rows))

    # ------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "seq_len": self.seq_len, "n_windows": self.n_windows}

    def load_state_dict(self, sd: dict) -> None:
        self.order.load_state_dict(sd, seq_len=self.seq_len, n_windows=self.n_windows)
