"""Rotary position embedding with DeepSeek's interleaved-pair layout, and YaRN.

DeepSeek checkpoints rotate adjacent pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i];
not the two-halves layout of Llama. A test pins this against transformers.

Position interpolation (`type: linear`, arXiv 2306.15595) divides every frequency by `factor`;
YaRN (arXiv 2309.00071) extends the context by `factor` s: NTK-by-parts frequencies
(dimensions whose wavelength is short against the original context keep their
frequency, long ones are divided by s, a linear ramp between) and an attention
temperature. DeepSeek applies the temperature as mscale(s, mscale_all_dim)^2 on the
softmax scale (see `softmax_scale`), and cos/sin are multiplied by
mscale(s, mscale) / mscale(s, mscale_all_dim), which is 1 for the official configs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    """The dimension index whose wavelength makes `rotations` turns over `max_pos` tokens."""
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d_h^R / 2] and the cos/sin amplitude for this config."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    rs = cfg.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) == "linear":   # position interpolation: every frequency / s
        return inv_freq / float(rs["factor"]), 1.0
    yarn = cfg.yarn
    if yarn is None:
        return inv_freq, 1.0
    s = float(yarn["factor"])
    orig = yarn["original_max_position_embeddings"]
    low = math.floor(_correction_dim(yarn.get("beta_fast") or 32, dim, base, orig))
    high = math.ceil(_correction_dim(yarn.get("beta_slow") or 1, dim, base, orig))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    # ramp = 0: high frequency, keep (extrapolate); ramp = 1: low frequency, interpolate by s.
    inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all = yarn.get("mscale"), yarn.get("mscale_all_dim")
    amp = yarn.get("attention_factor")
    if amp is None:
        amp = yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all) if (mscale and mscale_all) else yarn_mscale(s)
    return inv_freq, float(amp)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(d_h + d_h^R), times YaRN's mscale^2 when rope scaling is on."""
    scale = cfg.qk_head_dim ** -0.5
    yarn = cfg.yarn
    if yarn is not None and yarn.get("mscale_all_dim"):
        scale *= yarn_mscale(float(yarn["factor"]), yarn["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    """Produces cos/sin for given positions; holds no per-length cache (positions may be ragged)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.amplitude = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (or [T]) -> cos, sin of shape [B, T, d_h^R / 2], float32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq
        return torch.cos(angles) * self.amplitude, torch.sin(angles) * self.amplitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [..., T, R] (heads may sit between batch and T: pass
    cos/sin already broadcastable to x[..., ::2]). Computed in float32, returned in x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
