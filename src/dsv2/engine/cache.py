"""The latent KV cache: only c^KV (after its norm) and k^R (after RoPE), per slot and per layer.

One `LatentCache` belongs to one engine instance (never to the model): per layer a
c^KV buffer [slots, max_len, d_c] and a k^R buffer [slots, max_len, d_h^R] in the model's
dtype. Each slot holds one sequence with its own length, so prompts of different lengths
share a batch without padding: a decode step writes each slot's new latent at that slot's
own position and masks every slot's attention to its own length.

Bytes per token = (d_c + d_h^R) x layers x dtype size, which is MLA's whole point: a
per-head K/V cache of the same model would hold 2 x n_h x d_h per layer.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        if slots < 1 or max_len < 1:
            raise ValueError(f"a cache needs at least one slot and one position, got slots={slots}, "
                             f"max_len={max_len}.")
        self.slots, self.max_len, self.dtype = slots, max_len, dtype
        # One [slots, max_len, d_c + d_h^R] buffer per layer; c^KV and k^R are column views of
        # it, so absorbed attention scores both terms with one bmm against the 576-wide rows.
        C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.joint = [torch.zeros(slots, max_len, C + R, dtype=dtype, device=device)
                      for _ in range(cfg.num_hidden_layers)]
        self.c_kv = [j[..., :C] for j in self.joint]
        self.k_pe = [j[..., C:] for j in self.joint]
        # Tokens held per slot. A host-side list: positions are known without reading a tensor.
        self.lengths = [0] * slots

    def layers(self, rows: slice | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The per-layer (c_kv, k_pe) pairs the model takes as `kv`; `rows` selects slots as a view
        (no copy), so writes through it land in this cache."""
        rows = rows if rows is not None else slice(None)
        return [(c[rows], p[rows]) for c, p in zip(self.c_kv, self.k_pe)]

    def bytes_per_token(self) -> int:
        """(d_c + d_h^R) x layers x dtype size."""
        return sum(c.shape[-1] * c.element_size() + p.shape[-1] * p.element_size()
                   for c, p in zip(self.c_kv, self.k_pe))

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token() * self.slots * self.max_len

    def capacity_tokens(self) -> int:
        return self.slots * self.max_len

    def __repr__(self) -> str:
        return (f"LatentCache({self.slots} slots x {self.max_len} positions, "
                f"{self.bytes_per_token():,} bytes/token, {self.nbytes / 2**20:.1f} MiB)")


def common_prefix(a: list[int], b: list[int], limit: int | None = None) -> int:
    """How many leading token ids a and b share (at most `limit`): the cached prefix a request reuses."""
    n, limit = 0, min(len(a), len(b)) if limit is None else limit
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n
