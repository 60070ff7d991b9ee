"""The routed experts as native operators (experts.cpp), for prefill, scoring and training on CPU.

torch ran one matmul per expert across all the cores, and at these sizes each was slow: `small`'s
16 experts get ~128 rows each from a 512-token prompt. torch.ops.dsv2.experts_forward shares the
experts out between the threads instead, each running its experts' two products whole with the
SwiGLU between them while the rows are in its cache; experts_backward does the same for the
gradients. Both round as PyTorch's bfloat16 ops round. Under bfloat16 autocast the float32 weights
go in as they are: each thread rounds its expert's weights where it uses them and widens its weight
gradients into the float32 ones, where autocast cast the whole stacks before (and autograd the
gradients after) in separate passes.

    use_native_experts(model)   # every GroupedExperts -> NativeGroupedExperts (same parameters);
                                # the engine's prepare_for_decode and the trainer call it on CPU
    routed(x_MD, w13, w2, ends_E)   # inference: y [M, D]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from ..model.moe import GroupedExperts

_TYPES = (torch.float32, torch.bfloat16)


def can_run(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the operators take these: CPU tensors, rows and weights float32 or bfloat16 (weights
    of the other dtype are converted per expert inside: autocast's float32 weights for bfloat16 rows,
    or a bfloat16 model's prefill in float32), weights contiguous, and the native operators built."""
    from . import available
    return (x.device.type == "cpu" and x.dtype in _TYPES and w13.dtype in _TYPES and w2.dtype == w13.dtype
            and w13.is_contiguous() and w2.is_contiguous() and available(notice=False))


def routed(x_MD: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """y [M, D] for rows sorted by expert (rows [ends[e-1], ends[e]) are expert e's); no autograd."""
    return torch.ops.dsv2.experts_forward(x_MD.contiguous(), w13, w2, ends_E, False)[0]


def routed_int8(x_MD, q13, s13, q2, s2, ends_E) -> torch.Tensor:
    """As `routed` for int8 experts (quant/int8.py's rows and row scales), in float32 inside, with
    the int8 layers' integer products (where `quant.int8.integer_products()`); y in x's dtype."""
    y = torch.ops.dsv2.experts_int8(x_MD.float().contiguous(), q13.contiguous(), s13, q2.contiguous(), s2, ends_E)
    return y.to(x_MD.dtype)


class _Experts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MD, w13, w2, ends_E):
        y, h = torch.ops.dsv2.experts_forward(x_MD, w13, w2, ends_E, True)
        ctx.save_for_backward(x_MD, w13, w2, h, ends_E)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_MD, w13, w2, h, ends_E = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]
        dx, g13, g2 = torch.ops.dsv2.experts_backward(dy.contiguous(), x_MD, w13, w2, h, ends_E, need_dx)
        return (dx if need_dx else None), g13, g2, None


class NativeGroupedExperts(GroupedExperts):
    """GroupedExperts whose products run in the native operators where they can (see `can_run`);
    elsewhere (CUDA, mixed dtypes, sharded weights' local shards included) the model's own."""

    def _run(self, x_MD, w13, w2, counts):
        x = x_MD
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            x = x.to(torch.get_autocast_dtype("cpu"))   # the float32 weights are rounded per expert inside
        if not can_run(x, w13, w2):
            return super()._run(x_MD, w13, w2, counts)
        ends = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        return _Experts.apply(x.contiguous(), w13, w2, ends)


def use_native_experts(model: nn.Module) -> nn.Module:
    """Every GroupedExperts of model becomes a NativeGroupedExperts (the same object, parameters and
    state-dict keys; idempotent). -> model"""
    for m in model.modules():
        if type(m) is GroupedExperts:
            m.__class__ = NativeGroupedExperts
    return model
