"""The latent KV cache: only c^KV (after its norm) and k^R (after RoPE), per slot and per layer.

One `LatentCache` belongs to one engine instance (never to the model): per layer one
[slots, max_len, row] buffer whose rows hold a position's c^KV then k^R. Each slot holds one
sequence with its own length, so prompts of different lengths share a batch without padding:
a decode step writes each slot's new latent at that slot's own position and masks every
slot's attention to its own length.

Formats (`kv_cache_dtype`), per position and layer, for DeepSeek-V2's C = 512, R = 64:

    format     row layout                                                      bytes   bits/element
    (model's)  c^KV ; k^R in the model's dtype (bfloat16: 2 bytes each)        1152    16
    fp8        c^KV ; k^R as float8 e4m3, times one scale per layer            576     8
    int8       c^KV ; k^R as int8, then one float32 scale for the row (x/127)  580     8.06
    mixed      c^KV as 4-bit codes (-7..7), a bfloat16 scale per 32 (amax/7),  416     5.78
               then k^R in bfloat16 (it carries position: kept precise). A
               group's 32 codes fill 16 bytes: values 0-15 in the low nibbles,
               16-31 in the high ones, so both halves widen without shuffles

Bits per element count everything stored, scales included (416 x 8 / 576 = 5.78). The fp8
scale is one float per layer (1.0 unless set: c^KV is RMS-normed, so its values sit well
inside e4m3's +-448); values beyond the range are clamped.

Rows are written here (prefill, through `LayerView.store`) and by the fused decode step
(native/decode.cpp's kv_store) with the same rounding. The fused step reads the stored
rows directly; the PyTorch path (GPU, or the fused step switched off) widens the attended
window of one layer at a time for the step that reads it, and keeps nothing.

Bytes per token = row bytes x layers, which is MLA's whole point: a per-head K/V cache of
the same model would hold 2 x n_h x d_h per layer.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..dtypes import KV_CACHE_DTYPES

FP8_MAX = 448.0


class KVFormat:
    """How one cached position (c^KV [C] then k^R [R]) is packed into a row of bytes."""
    name = ""
    code = 0   # the fused step's format number (native/decode.h)

    def __init__(self, C: int, R: int):
        self.C, self.R = C, R

    def row_bytes(self) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """x [..., C + R] -> uint8 [..., row_bytes]."""
        raise NotImplementedError

    def decode(self, rows: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """uint8 [..., row_bytes] -> float32 [..., C + R]."""
        raise NotImplementedError

    def bits_per_element(self) -> float:
        return self.row_bytes() * 8 / (self.C + self.R)


class Fp8Format(KVFormat):
    name, code = "fp8", 4

    def row_bytes(self) -> int:
        return self.C + self.R

    def encode(self, x, scale):
        return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)

    def decode(self, rows, scale):
        return rows.view(torch.float8_e4m3fn).float() * scale


class Int8Format(KVFormat):
    name, code = "int8", 5

    def _values(self) -> int:   # int8 values, padded so the float32 scale is aligned
        return (self.C + self.R + 3) // 4 * 4

    def row_bytes(self) -> int:
        return self._values() + 4

    def encode(self, x, scale):
        x = x.float()
        amax = x.abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = (x / s).round().to(torch.int8).view(torch.uint8)
        pad = q.new_zeros(*q.shape[:-1], self._values() - q.shape[-1])
        return torch.cat([q, pad, s.view(torch.uint8)], -1)

    def decode(self, rows, scale):
        n, v = self.C + self.R, self._values()
        s = rows[..., v: v + 4].contiguous().view(torch.float32)
        return rows[..., :n].view(torch.int8).float() * s


class MixedFormat(KVFormat):
    """c^KV in 4 bits with a bfloat16 scale per group of 32, k^R in bfloat16."""
    name, code = "mixed", 6
    GROUP = 32

    def __init__(self, C: int, R: int):
        if C % self.GROUP:
            raise ValueError(f"the mixed KV cache packs c^KV in groups of {self.GROUP}, but kv_lora_rank is {C}: "
                             "use fp8 or int8 for this model.")
        super().__init__(C, R)

    def row_bytes(self) -> int:
        return self.C // 2 + 2 * (self.C // self.GROUP) + 2 * self.R

    def encode(self, x, scale):
        x = x.float()
        c = x[..., : self.C].unflatten(-1, (-1, self.GROUP))
        amax = c.abs().amax(-1, keepdim=True)
        s = torch.where(amax > 0, amax / 7, torch.ones_like(amax)).to(torch.bfloat16)
        q = ((c / s.float()).round().clamp(-7, 7) + 8).to(torch.uint8)
        packed = (q[..., :16] | (q[..., 16:] << 4)).flatten(-2)   # a group's values 0-15 low, 16-31 high
        return torch.cat([packed, s.flatten(-2).view(torch.uint8),
                          x[..., self.C:].to(torch.bfloat16).view(torch.uint8)], -1)

    def decode(self, rows, scale):
        C, G = self.C, self.GROUP
        packed = rows[..., : C // 2].unflatten(-1, (-1, G // 2))
        q = torch.cat([packed & 15, packed >> 4], -1).flatten(-2).float() - 8
        s = rows[..., C // 2: C // 2 + 2 * (C // G)].contiguous().view(torch.bfloat16).float()
        c = (q.unflatten(-1, (-1, G)) * s[..., None]).flatten(-2)
        pe = rows[..., C // 2 + 2 * (C // G):].contiguous().view(torch.bfloat16).float()
        return torch.cat([c, pe], -1)


FORMATS = {f.name: f for f in (Fp8Format, Int8Format, MixedFormat)}


def kv_format(name: str | None, cfg: ModelConfig) -> KVFormat | None:
    """The packed format named (None for the model's own dtype)."""
    name = check_kv_cache_dtype(name)
    if name in (None, "auto", "bfloat16", "float32"):
        return None
    return FORMATS[name](cfg.kv_lora_rank, cfg.qk_rope_head_dim)


def check_kv_cache_dtype(name: str | None) -> str | None:
    if name is not None and name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}: use one of {', '.join(KV_CACHE_DTYPES)} "
                         "(auto: the model's dtype).")
    return name


def cache_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The element dtype of an unpacked cache: bfloat16 / float32 when named, else the model's."""
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(name or "auto", model_dtype)


def _row(cfg: ModelConfig, fmt: KVFormat | None, kv_cache_dtype: str | None, model_dtype: torch.dtype):
    """(elements of a layer's row for one position, their dtype): bytes when packed."""
    if fmt is not None:
        return fmt.row_bytes(), torch.uint8
    return cfg.kv_lora_rank + cfg.qk_rope_head_dim, cache_dtype(kv_cache_dtype, model_dtype)


def bytes_per_token(cfg: ModelConfig, kv_cache_dtype: str | None = None,
                    model_dtype: torch.dtype = torch.bfloat16) -> int:
    """Cache bytes one token takes across all layers (scales included)."""
    n, dtype = _row(cfg, kv_format(kv_cache_dtype, cfg), kv_cache_dtype, model_dtype)
    return n * dtype.itemsize * cfg.num_hidden_layers


class LayerView:
    """One layer of a cache, some of its slots (rows): where MLA stores new latents and reads the
    window it attends to."""

    def __init__(self, buf: torch.Tensor, C: int, fmt: KVFormat | None, scale: torch.Tensor | None):
        self.buf, self.C, self.fmt, self.scale = buf, C, fmt, scale

    def store(self, positions_BT: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        rows = torch.arange(positions_BT.shape[0], device=positions_BT.device)[:, None]
        joint = torch.cat([c_kv, k_pe], -1)
        joint = joint.to(self.buf.dtype) if self.fmt is None else self.fmt.encode(joint, self.scale)
        # One in-place write of whole rows: torch.compile then updates the cache in place, where
        # writes to column slices made it copy the layer's whole buffer every step.
        self.buf.index_put_((rows.expand_as(positions_BT), positions_BT), joint)

    def window(self, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
        """Positions [0, kv_len) as [B, S, C + R] (c^KV then k^R): a view of the buffer, or (packed
        formats) one widened copy made for this call."""
        rows = self.buf[:, :kv_len]
        return rows if self.fmt is None else self.fmt.decode(rows, self.scale).to(dtype)


class LatentCache:
    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kv_cache_dtype: str | None = None):
        if slots < 1 or max_len < 1:
            raise ValueError(f"a cache needs at least one slot and one position, got slots={slots}, "
                             f"max_len={max_len}.")
        self.fmt = kv_format(kv_cache_dtype, cfg)
        self.slots, self.max_len = slots, max_len
        row, self.dtype = _row(cfg, self.fmt, kv_cache_dtype, dtype)
        self.kv_cache_dtype = self.fmt.name if self.fmt else str(self.dtype).split(".")[-1]
        C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.C, self.R = C, R
        # One [slots, max_len, row] buffer per layer (unpacked: c^KV and k^R side by side, so
        # absorbed attention scores both terms with one bmm against the 576-wide rows).
        self.joint = [torch.zeros(slots, max_len, row, dtype=self.dtype, device=device)
                      for _ in range(cfg.num_hidden_layers)]
        # fp8: one scale per layer (stored value = latent / scale).
        self.scales = torch.ones(cfg.num_hidden_layers, device=device) if isinstance(self.fmt, Fp8Format) else None
        if self.fmt is None:
            self.c_kv = [j[..., :C] for j in self.joint]
            self.k_pe = [j[..., C:] for j in self.joint]
        # Tokens held per slot. A host-side list: positions are known without reading a tensor.
        self.lengths = [0] * slots

    def layers(self, rows: slice | None = None) -> list[LayerView]:
        """Per-layer views the model takes as `kv`; `rows` selects slots as a view (no copy), so
        writes through it land in this cache."""
        rows = rows if rows is not None else slice(None)
        return [LayerView(j[rows], self.C, self.fmt, None if self.scales is None else self.scales[i])
                for i, j in enumerate(self.joint)]

    def widened(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s whole buffer as float32 [slots, max_len, C + R] (a copy; for tests and tools)."""
        return self.layers()[layer].window(self.max_len, torch.float32).float()

    def bytes_per_token(self) -> int:
        """Row bytes x layers, scales included."""
        return sum(j.shape[-1] * j.element_size() for j in self.joint)

    def bits_per_element(self) -> float:
        """Stored bits per cached number (c^KV and k^R), scales included."""
        return self.bytes_per_token() * 8 / (len(self.joint) * (self.C + self.R))

    @property
    def nbytes(self) -> int:
        return self.bytes_per_token() * self.slots * self.max_len

    def capacity_tokens(self) -> int:
        return self.slots * self.max_len

    def __repr__(self) -> str:
        return (f"LatentCache({self.slots} slots x {self.max_len} positions, {self.kv_cache_dtype}, "
                f"{self.bytes_per_token():,} bytes/token, {self.nbytes / 2**20:.1f} MiB)")


def common_prefix(a: list[int], b: list[int], limit: int | None = None) -> int:
    """How many leading token ids a and b share (at most `limit`): the cached prefix a request reuses."""
    n, limit = 0, min(len(a), len(b)) if limit is None else limit
    for x, y in zip(a, b):
        if n >= limit or x != y:
            break
        n += 1
    return n


def slots_for(budget_bytes: float, seq_len: int, per_token: int) -> int:
    """Sequences of seq_len positions a cache budget holds at per_token bytes each."""
    return int(budget_bytes // (seq_len * per_token))
