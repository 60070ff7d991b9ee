"""Multi-head Latent Attention (MLA): low-rank joint KV compression with decoupled RoPE.

Per token (paper §2.1, with its symbols):
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
token per layer, in the model's dtype or packed to fewer bits (engine/cache.py). It is
allocated per request batch by the engine and passed in as `kv`.

Shape legend: B batch, T new tokens, S cached positions, H heads, C = d_c, R = d_h^R,
N = d_h (nope part), V = v_head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .mask import causal_mask
from .norm import RMSNorm
from .linear import Linear
from .rope import apply_rope, softmax_scale


@dataclass
class KVStep:
    """Where this forward's tokens sit in the cache, shared by every layer.

    positions: [B, T] absolute positions of the new tokens (also their cache slots).
    kv_len:    attend over cache slots [0, kv_len); a Python int so no host sync is needed.
    mask:      [B, T, kv_len] bool, True where a query may attend (causal and per-sequence).

    Variable-length rows (scoring): the tokens come as one packed row [1, N], so no layer but
    attention spends work on padding, and attention runs over B padded rows of T slots:
    layout:    [B, T] the packed index of the token in each slot (padding slots repeat any
               token, which the mask hides); mask is then [B, T, T] over the slots.
    slots:     [N] each packed token's slot, flat in B x T.
    """
    positions: torch.Tensor
    kv_len: int
    mask: torch.Tensor
    layout: torch.Tensor | None = None
    slots: torch.Tensor | None = None

    @classmethod
    def causal(cls, positions: torch.Tensor, kv_len: int) -> "KVStep":
        return cls(positions, kv_len, causal_mask(positions, kv_len))


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
            self.q_proj = Linear(d, H * qk, bias=False)                              # W^Q
        else:
            self.q_a_proj = Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)      # W^DQ
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, bias=False)              # W^UQ ; W^QR
        self.kv_a_proj_with_mqa = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=cfg.attention_bias)                     # W^DKV ; W^KR
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                   bias=False)                                           # W^UK ; W^UV
        self.o_proj = Linear(H * cfg.v_head_dim, d, bias=cfg.attention_bias)          # W^O

    # ------------------------------------------------------------ projections
    def _query(self, x_BTD: torch.Tensor, cos, sin, rotate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q_nope [B, T, H, N], q_pe [B, T, H, R] (rotated unless rotate=False)."""
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q = q.unflatten(-1, (self.n_heads, self.nope_dim + self.rope_dim))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, self._rope(q_pe, cos, sin) if rotate else q_pe

    def latent(self, x_BTD: torch.Tensor, cos, sin, rotate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cache stores: c^KV [B, T, C] (normed) and k^R [B, T, R] (rotated unless rotate=False)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), self._rope(k_pe, cos, sin) if rotate else k_pe

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on x [B, T, R] or [B, T, H, R] (every head alike), cos/sin [B, T, R / 2]; a subclass may
        compute it another way (native/attention.py)."""
        if x.dim() == 4:
            cos, sin = cos[:, :, None], sin[:, :, None]
        return apply_rope(x, cos, sin)

    def _w_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK [H, N, C] and W^UV [H, V, C], views of kv_b_proj's weight."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:]

    # ---------------------------------------------------------------- forward
    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, step: KVStep | None = None,
                absorb: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over the new tokens, and over cached ones when `kv` is given.

        kv:   this layer's cache (engine/cache.py's LayerView): the new latents are stored at
              `step.positions`, then the window [0, kv_len) is attended (c_kv [B, S, C], k_pe [B, S, R]).
        step: where the tokens sit; its mask (if any) applies with or without a cache (packed
              training rows pass a block-diagonal one, model/mask.py).
        absorb: use the weight-absorbed path (decode); otherwise decompress K/V (naive).
        rows: [B, R] indices into T: return only these tokens' outputs ([B, R, D]), skipping the
              output projection for the rest (scoring's last layer).
        """
        q_nope, q_pe = self._query(x_BTD, cos, sin, rotate=False)
        c_kv, k_pe = self.latent(x_BTD, cos, sin, rotate=False)
        # One rotation for the H query parts and the shared key part: half the small ops per step.
        pe = self._rope(torch.cat([q_pe, k_pe[:, :, None]], dim=2), cos, sin)
        q_pe, k_pe = pe[:, :, :-1], pe[:, :, -1]
        mask = None if step is None else step.mask
        latent = None
        if kv is not None:
            kv.store(step.positions, c_kv, k_pe)
            latent = kv.window(step.kv_len, c_kv.dtype)            # [B, S, C + R]: c^KV ; k^R per position
            c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        varlen = step is not None and step.layout is not None
        if varlen:   # from the one packed row to the padded rows attention runs in
            def padded(t):   # index_select: ~4x faster than advanced indexing on CPU
                return t[0].index_select(0, step.layout.flatten()).unflatten(0, step.layout.shape)
            q_nope, q_pe, c_kv, k_pe = (padded(t) for t in (q_nope, q_pe, c_kv, k_pe))
            latent = None if latent is None else padded(latent)
        if absorb:
            if latent is None:
                latent = torch.cat([c_kv, k_pe], dim=-1)
            out = self._attend_absorbed(q_nope, q_pe, latent, mask)
        else:
            out = self._attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        if varlen:
            out = out.flatten(0, 1).index_select(0, step.slots)[None]
        if rows is not None:
            out = torch.take_along_dim(out, rows[..., None, None], dim=1)
        return self.o_proj(out.flatten(2))

    def _decompress(self, c_kv: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[k^C ; v^C] = W^UK c^KV ; W^UV c^KV in dtype -> k_nope [B, S, H, N], v [B, S, H, V] (views of one tensor)."""
        kv = self.kv_b_proj(c_kv.to(dtype)).unflatten(-1, (self.n_heads, self.nope_dim + self.v_dim))
        return kv.split([self.nope_dim, self.v_dim], dim=-1)

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Decompress keys/values per head, then scaled dot-product attention. -> [B, T, H, V]"""
        B, S = c_kv.shape[:2]
        k_nope, v = self._decompress(c_kv, q_nope.dtype)
        k = torch.cat([k_nope, k_pe.to(q_nope.dtype)[:, :, None].expand(B, S, self.n_heads, self.rope_dim)], -1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        V = self.v_dim
        # Zero-pad V to the query/key width: SDPA's fused (flash) kernel needs equal widths and
        # otherwise falls back to its unfused math path, which on CPU was ~2.5x slower for a
        # 512-token prefill and ~1.5x slower forward + backward in training (measured); the
        # padded output columns are dropped (their gradient is zero). With attention dropout in
        # training CPU SDPA takes the math path anyway, where padding would only add work.
        dropout = self.dropout if self.training else 0.0
        pad = q.shape[-1] - V if V < q.shape[-1] and dropout == 0 else 0
        if pad:
            v = F.pad(v, (0, pad))
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if mask is None else mask[:, None],
            is_causal=mask is None and q.shape[1] > 1,
            dropout_p=dropout, scale=self.scale)
        return o.transpose(1, 2)[..., :V]

    def _attend_absorbed(self, q_nope, q_pe, latent, mask) -> torch.Tensor:
        """Scores against the latent: (q^C W^UK) . c^KV + q^R . k^R; output W^UV (sum p c^KV). -> [B, T, H, V]

        latent [B, S, C + R] holds c^KV and k^R side by side, so one bmm takes both score terms
        against the 576-wide rows, with the heads folded into the query rows ([B, T*H, C + R]):
        on CPU an explicit bmm was measured far faster than einsum or SDPA with enable_gqa.
        """
        B, T, H, N = q_nope.shape
        S, C = latent.shape[1], self.kv_lora_rank
        dt = q_nope.dtype
        w_uk, w_uv = self._w_uk_uv()
        latent = latent.to(dt)
        # W^UK folded into the query: per head [B*T, N] @ [N, C].
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, N), w_uk.to(dt))
        q_lat = q_lat.view(H, B, T, C).permute(1, 2, 0, 3)                         # [B, T, H, C]
        q = torch.cat([q_lat, q_pe], dim=-1).reshape(B, T * H, C + self.rope_dim)
        scores = torch.bmm(q, latent.transpose(1, 2)).view(B, T, H, S).float() * self.scale
        if mask is not None:
            scores.masked_fill_(~mask[:, :, None], float("-inf"))
        elif T > 1:   # the new tokens are the last T of the S attended
            causal = causal_mask(torch.arange(S - T, S, device=scores.device)[None], S)
            scores.masked_fill_(~causal[:, :, None], float("-inf"))
        p = scores.softmax(dim=-1).to(dt).view(B, T * H, S)
        o_lat = torch.bmm(p, latent[..., :C])                                         # [B, T*H, C]
        # W^UV after the weighted sum: per head [B*T, C] @ [C, V].
        o = torch.bmm(o_lat.view(B, T, H, C).permute(2, 0, 1, 3).reshape(H, B * T, C),
                      w_uv.to(dt).transpose(1, 2))
        return o.view(H, B, T, self.v_dim).permute(1, 2, 0, 3)
