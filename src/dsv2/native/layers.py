"""RMSNorm, RoPE and the MoE combine as native CPU operators (layers.cpp), with their backwards.

In a bfloat16 prefill of 512 tokens on the `small` preset these small ops took ~15 ms of ~120:
PyTorch runs RMSNorm as six elementwise passes, RoPE as a widening copy, four products and a
stack, and the combine as an index_copy_ and a batched matmul of K rows. Each is one pass over
its rows here, float32 inside, rounded where the model's code rounds (model/norm.py: normalised
in float32, rounded to x's dtype, scaled in the output's; model/rope.py: rotated in float32). The
combine keeps the gate weights in float32 (as transformers' DeepSeek-V2 does), where the PyTorch
path rounds them to the experts' dtype first.

    use_native_layers(model)   # every RMSNorm -> NativeRMSNorm, every MoE's LocalDispatcher ->
                               # NativeDispatcher; RoPE comes with NativeMLA (use_native_attention);
                               # swap.use_native does all of them (the engine and the trainer on CPU)

Shape legend: N tokens, D hidden, K experts per token, M routed copies (<= N K), B batch, T
positions, H heads, R rope dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..model.moe import DispatchState, LocalDispatcher, MoE, _is_dtensor
from ..model.norm import RMSNorm

_TYPES = (torch.float32, torch.bfloat16)


def native_layers() -> bool:
    """Whether the operators can run here (the native operators are built; DSV2_NATIVE=0 switches
    them off)."""
    from . import available
    return available(notice=False)


def _applies(*tensors: torch.Tensor) -> bool:
    """Plain CPU tensors (not DTensors) of float32 or bfloat16, outside torch.compile (whose own
    kernels fuse these ops, and which should not trace the availability check), with the
    operators built."""
    return (not torch.compiler.is_compiling()
            and all(t.device.type == "cpu" and t.dtype in _TYPES and not _is_dtensor(t) for t in tensors)
            and native_layers())


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, D] with a contiguous last dimension (a view where its strides allow)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


# ---------------------------------------------------------------------------------- RMSNorm
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, weight, eps):
        y, rstd = torch.ops.dsv2.rms_norm(x_RD, weight, eps)
        ctx.save_for_backward(x_RD, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_RD, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.dsv2.rms_norm_backward(_rows(dy), x_RD, weight, rstd)
        return dx, dw.to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model/norm.py's RMSNorm of x [..., D] by weight [D], in the promotion of their dtypes. Differentiable."""
    x_RD = _rows(x)
    if _wants_grad(x, weight):
        y = _RMSNorm.apply(x_RD, weight, eps)
    else:
        y = torch.ops.dsv2.rms_norm(x_RD, weight, eps)[0]
    return y.view(*x.shape[:-1], y.shape[-1])


class NativeRMSNorm(RMSNorm):
    """RMSNorm as one operator on CPU in float32 or bfloat16; elsewhere the model's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _applies(x, self.weight):
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)


# ------------------------------------------------------------------------------------- RoPE
class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_BTHR, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.dsv2.rope(x_BTHR, cos, sin, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        return torch.ops.dsv2.rope(dy, cos, sin, True), None, None   # the rotation's transpose


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model/rope.py's apply_rope on x [B, T, R] or [B, T, H, R] (every head alike) by cos/sin
    [B, T, R / 2] (a batch of 1 is broadcast), in x's dtype. Differentiable in x (not in cos/sin)."""
    x4 = x if x.dim() == 4 else x[:, :, None]
    if x4.stride(-1) != 1:
        x4 = x4.contiguous()
    B, T = x4.shape[:2]
    cos, sin = cos.expand(B, T, -1), sin.expand(B, T, -1)
    out = _Rope.apply(x4, cos, sin) if _wants_grad(x) else torch.ops.dsv2.rope(x4, cos, sin, False)
    return out if x.dim() == 4 else out[:, :, 0]


def rope_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `rope` runs for these inputs (cos/sin float32 and not differentiated, x 3-D or 4-D)."""
    return (x.dim() in (3, 4) and cos.dtype == sin.dtype == torch.float32 and cos.dim() == 3
            and not _wants_grad(cos, sin) and _applies(x, cos, sin))


# ---------------------------------------------------------------------------------- combine
class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_MD, order_M, weight_NK):
        ctx.save_for_backward(y_MD, order_M, weight_NK)
        return torch.ops.dsv2.moe_combine(y_MD, order_M, weight_NK)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_ND):
        y_MD, order_M, weight_NK = ctx.saved_tensors
        dy, dw = torch.ops.dsv2.moe_combine_backward(_rows(dout_ND), y_MD, order_M, weight_NK)
        return dy, None, dw.to(weight_NK.dtype)


def moe_combine(y_MD: torch.Tensor, order_M: torch.Tensor, weight_NK: torch.Tensor) -> torch.Tensor:
    """out_ND[n] = sum_k weight_NK[n, k] y_MD[m] where order_M[m] = n K + k (copies absent from
    order_M add nothing), in y's dtype. Differentiable in y and the weights."""
    y_MD, order_M, weight_NK = _rows(y_MD), order_M.contiguous(), weight_NK.contiguous()
    if _wants_grad(y_MD, weight_NK):
        return _Combine.apply(y_MD, order_M, weight_NK)
    return torch.ops.dsv2.moe_combine(y_MD, order_M, weight_NK)


class NativeDispatcher(LocalDispatcher):
    """LocalDispatcher whose combine is one operator on CPU (float32 or bfloat16 rows and weights)."""

    def combine(self, y_MD: torch.Tensor, state: DispatchState, weight_NK: torch.Tensor,
                n_tokens: int) -> torch.Tensor:
        if (weight_NK.shape[0] != n_tokens or y_MD.dim() != 2 or state.order_M.dtype != torch.int64
                or not _applies(y_MD, weight_NK)):
            return super().combine(y_MD, state, weight_NK, n_tokens)
        return moe_combine(y_MD, state.order_M, weight_NK)


def use_native_layers(model: nn.Module) -> nn.Module:
    """Every RMSNorm becomes a NativeRMSNorm and every MoE's LocalDispatcher a NativeDispatcher (the
    same objects, parameters and state-dict keys; idempotent; other dispatchers, e.g. expert
    parallelism's, are left alone). -> model"""
    for m in model.modules():
        if type(m) is RMSNorm:
            m.__class__ = NativeRMSNorm
        elif isinstance(m, MoE) and type(m.dispatcher) is LocalDispatcher:
            m.dispatcher.__class__ = NativeDispatcher
    return model
