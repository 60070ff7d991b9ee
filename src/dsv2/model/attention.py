"""Multi-head Latent Attention (MLA): low-rank joint KV compression with decoupled RoPE.

Per token (paper §2.1; symbols as in SPEC.md):
    c^Q  = W^DQ h            (q_a_proj, then q_a_layernorm)       skipped when q_lora_rank is None
    q    = W^UQ c^Q | W^Q h  (q_b_proj | q_proj) -> per head [q^C ; q^R]
    [c^KV ; k^R] = W^DKV h ; W^KR h   (kv_a_proj_with_mqa), then kv_a_layernorm on c^KV
    [k^C ; v^C]  = W^UK c^KV ; W^UV c^KV   (kv_b_proj), per head
    k^R is ONE rope key shared by every head.

Two paths compute the same attention, kept side by side and tested equal:
- naive: decompress per-head keys and values from the latent and run ordinary attention.
  Used for training and prefill, where T is large and the up-projection is amortised.
- absorbed: fold W^UK into the query (q^C W^UK -> latent space) and W^UV after the
  weighted sum of latents, so scores are taken against the cached latent directly and
  per-head keys/values are never materialised. Used for decode.

The cache holds only c^KV (after its norm) and k^R (after RoPE): (d_c + d_h^R) numbers per
token per layer. It is allocated per request batch by the engine and passed in as `kv`.

Shape legend: B batch, T new tokens, S cached positions, H heads, C = d_c, R = d_h^R,
N = d_h (nope part), V = v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rope, softmax_scale


@dataclass
class KVStep:
    """Where this forward's tokens sit in the cache, shared by every layer.

    positions: [B, T] absolute positions of the new tokens (also their cache slots).
    kv_len:    attend over cache slots [0, kv_len); a Python int so no host sync is needed.
    mask:      [B, T, kv_len] bool, True where a query may attend (causal and per-sequence).
    """
    positions: torch.Tensor
    kv_len: int
    mask: torch.Tensor

    @classmethod
    def causal(cls, positions: torch.Tensor, kv_len: int) -> "KVStep":
        slots = torch.arange(kv_len, device=positions.device)
        return cls(positions, kv_len, slots[None, None, :] <= positions[:, :, None])


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.dropout = cfg.attention_dropout
        self.scale = softmax_scale(cfg)
        d, H, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * qk, bias=False)                              # W^Q
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)      # W^DQ
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)              # W^UQ ; W^QR
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=cfg.attention_bias)                     # W^DKV ; W^KR
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                   bias=False)                                           # W^UK ; W^UV
        self.o_proj = nn.Linear(H * cfg.v_head_dim, d, bias=cfg.attention_bias)          # W^O

    # ------------------------------------------------------------ projections
    def _query(self, x_BTD: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q_nope [B, T, H, N], q_pe [B, T, H, R] (rotated)."""
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q = q.unflatten(-1, (self.n_heads, self.nope_dim + self.rope_dim))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos[:, :, None], sin[:, :, None])

    def latent(self, x_BTD: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: c^KV [B, T, C] (normed) and k^R [B, T, R] (rotated)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK [H, N, C] and W^UV [H, V, C], views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    # ---------------------------------------------------------------- forward
    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, step: KVStep | None = None,
                absorb: bool = False) -> torch.Tensor:
        """Attention over the new tokens, and over cached ones when `kv` is given.

        kv:   this layer's cache buffers (c_kv [B, S, C], k_pe [B, S, R]); the new latents are
              written at `step.positions` before attending.
        absorb: use the weight-absorbed path (decode); otherwise decompress K/V (naive).
        """
        q_nope, q_pe = self._query(x_BTD, cos, sin)
        c_kv, k_pe = self.latent(x_BTD, cos, sin)
        mask = None
        if kv is not None:
            c_buf, pe_buf = kv
            rows = torch.arange(x_BTD.shape[0], device=x_BTD.device)[:, None]
            c_buf[rows, step.positions] = c_kv.to(c_buf.dtype)
            pe_buf[rows, step.positions] = k_pe.to(pe_buf.dtype)
            c_kv, k_pe = c_buf[:, : step.kv_len], pe_buf[:, : step.kv_len]
            mask = step.mask
        if absorb:
            out = self._attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)
        else:
            out = self._attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        return self.o_proj(out.flatten(2))

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Decompress keys/values per head, then scaled dot-product attention. -> [B, T, H, V]"""
        B, S = c_kv.shape[:2]
        kv = self.kv_b_proj(c_kv.to(q_nope.dtype)).unflatten(-1, (self.n_heads, self.nope_dim + self.v_dim))
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.to(q_nope.dtype)[:, :, None].expand(B, S, self.n_heads, self.rope_dim)], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None and q.shape[1] > 1,
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return o.transpose(1, 2)

    def _attend_absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Scores against the latent: (q^C W^UK) . c^KV + q^R . k^R; output W^UV (sum p c^KV). -> [B, T, H, V]"""
        w_uk, w_uv = self._w_uk_uv()
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk.to(q_nope.dtype))
        c_kv, k_pe = c_kv.to(q_lat.dtype), k_pe.to(q_lat.dtype)
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, c_kv)
                  + torch.einsum("bthr,bsr->bhts", q_pe, k_pe)).float() * self.scale
        if mask is None:
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)[None]
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        p = scores.softmax(dim=-1).to(q_lat.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", p, c_kv)
        return torch.einsum("bthc,hvc->bthv", o_lat, w_uv.to(o_lat.dtype))
