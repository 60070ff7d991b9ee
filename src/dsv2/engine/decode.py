"""One batched decode forward: every decoding slot feeds one token through the absorbed MLA path.

Kept apart from the engine's bookkeeping so it can be compiled: its inputs are a [B, 1]
token tensor, the slots' positions and the attended length, and it returns [B, V] logits.
"""

from __future__ import annotations

import sys

import torch

from ..model.attention import KVStep


class DecodeStep:
    def __init__(self, model, compile: bool | None = None):
        self.model = model
        self.fn = self._eager
        self.compiled = False

    def _eager(self, tokens_B1, positions_B1, kv_len: int, kv) -> torch.Tensor:
        slots = torch.arange(kv_len, device=tokens_B1.device)
        step = KVStep(positions_B1, kv_len, slots[None, None, :] <= positions_B1[:, :, None])
        return self.model(tokens_B1, kv=kv, step=step, absorb=True, last_only=True)[:, 0]

    def __call__(self, tokens_B1, pos: list[int], kv_len: int, cache, hi: int) -> torch.Tensor:
        positions_B1 = torch.tensor(pos, dtype=torch.long, device=tokens_B1.device)[:, None]
        return self.fn(tokens_B1, positions_B1, kv_len, cache.layers(slice(0, hi)))
