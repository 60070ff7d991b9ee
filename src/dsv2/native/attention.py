"""MLA's naive attention as one native operator (attention.cpp), for prefill, scoring and training.

PyTorch's CPU flash kernel needs the value as wide as the query, so MLA's values were zero-padded
to it (v_head_dim 32 or 128 against a query of 96 or 192), its shared k^R copied to every head,
and a short prompt's masked half computed anyway. torch.ops.dsv2.attention packs each head's keys
and values at their own widths and skips the blocks no query may see; attention_lse and
attention_backward give training the same forward and flash attention's backward (p recomputed
from the saved log-sum-exp), in float32 whatever the inputs' dtype.

    use_native_attention(model)   # every MLA -> NativeMLA (same parameters); the engine and the
                                  # trainer call it on CPU

NativeMLA also rotates with layers.py's RoPE operator.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..model.attention import MLA
from .layers import rope, rope_applies


def native_attention() -> bool:
    """Whether torch.ops.dsv2.attention can run here (the native operators are built; DSV2_NATIVE=0
    switches them off)."""
    from . import available
    return available(notice=False)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_pe, k_nope, k_pe, v, mask, scale):
        out, lse = torch.ops.dsv2.attention_lse(q_nope, q_pe, k_nope, k_pe, v, mask, scale)
        ctx.save_for_backward(q_nope, q_pe, k_nope, k_pe, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable   # the backward is one operator: no second derivatives through it
    def backward(ctx, dout):
        q_nope, q_pe, k_nope, k_pe, v, out, lse, mask = ctx.saved_tensors
        delta = (dout.float() * out.float()).sum(-1).contiguous()
        dq_nope, dq_pe, dk_nope, dk_pe_heads, dv = torch.ops.dsv2.attention_backward(
            dout.contiguous(), q_nope, q_pe, k_nope, k_pe, v, mask, lse, delta, ctx.scale)
        dk_pe = dk_pe_heads.sum(2, dtype=torch.float32).to(k_pe.dtype)   # k^R is every head's
        return dq_nope, dq_pe, dk_nope, dk_pe, dv, None, None


def attention(q_nope, q_pe, k_nope, k_pe, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T scale) v per head -> [B, T, H, V]; q = [q_nope ; q_pe] [B, T, H, N + R],
    k = [k_nope ; k_pe] with k_pe [B, S, R] shared by the heads. mask [B, T, S] (True: may attend),
    or None: causal with the queries the last T of the S keys. Differentiable."""
    if mask is not None and mask.stride(-1) != 1:
        mask = mask.contiguous()
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q_nope, q_pe, k_nope, k_pe, v)):
        return _Attention.apply(q_nope, q_pe, k_nope, k_pe, v, mask, scale)
    return torch.ops.dsv2.attention(q_nope, q_pe, k_nope, k_pe, v, mask, scale)


class NativeMLA(MLA):
    """MLA whose naive attention is `attention` above on CPU, in float32 or bfloat16 (under
    autocast, the autocast dtype, as SDPA would run); elsewhere, or with attention dropout in
    training, the model's SDPA path. Its RoPE is layers.py's operator where that applies."""

    def _rope(self, x, cos, sin) -> torch.Tensor:
        if not rope_applies(x, cos, sin):
            return super()._rope(x, cos, sin)
        return rope(x, cos, sin)

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        cpu = q_nope.device.type == "cpu"
        dt = torch.get_autocast_dtype("cpu") if cpu and torch.is_autocast_enabled("cpu") else q_nope.dtype
        if (not cpu or dt not in (torch.float32, torch.bfloat16) or (self.training and self.dropout > 0)
                or not native_attention()):
            return super()._attend_naive(q_nope, q_pe, c_kv, k_pe, mask)
        k_nope, v = self._decompress(c_kv, dt)
        return attention(q_nope.to(dt), q_pe.to(dt), k_nope.to(dt), k_pe.to(dt), v.to(dt), mask, self.scale)


def use_native_attention(model: nn.Module) -> nn.Module:
    """Every MLA of model becomes a NativeMLA (the same object, parameters and state-dict keys;
    idempotent). -> model"""
    for m in model.modules():
        if type(m) is MLA:
            m.__class__ = NativeMLA
    return model
