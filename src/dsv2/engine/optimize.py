"""Inference speed-ups, applied to a model from outside in one place (as `parallelize()` does for
training), so `model/` keeps only the reference and the absorbed paths.

    prepare_for_decode(model)     # idempotent; the engine and the scorer call it

swaps modules for ones holding the same parameters (same state-dict keys, tied weights kept):

- every MoE layer -> `DecodeMoE`: routing and the permutation of token copies stay on the
  device (a sort and a `searchsorted` instead of `bincount(...).tolist()`), and the routed
  experts run as one custom operator, `dsv2::routed_experts`, over the sorted rows. A decode
  step then has no host sync and compiles into one graph (`torch.compile(fullgraph=True)`).
- every GroupedExperts -> `NativeGroupedExperts` (native/experts.py): on CPU the routed experts
  of a prefill or a training step run as `dsv2::experts_forward` / `experts_backward`, the experts
  shared out between the threads instead of each expert's matmul split across them.
- every MLA -> `NativeMLA` (native/attention.py): on CPU its naive attention (prefill, scoring)
  is one custom operator, `dsv2::attention`, in place of SDPA: keys and values at their own
  widths (SDPA's flash kernel wants the value zero-padded to the query's width), the shared k^R
  never copied per head, and no work on the causal mask's empty half (bench/prefill_attention.py).
  Its RoPE, every RMSNorm and the MoE layers' combine are native operators too (native/layers.py).
- `lm_head` (a float one) -> `RowsHead`: on CPU, a few rows against the whole vocabulary are
  computed as (W h^T)^T: MKL's sgemm took 1.5-4x longer for h W^T at 2-128 rows (batched decode).

Under autograd or in training mode the swapped MoE and head run their base class's forward, and
NativeMLA and NativeGroupedExperts their differentiable operators (native/swap.py: the trainer's
model takes the same swaps on CPU), so a policy model that generates its own rollouts (GRPO)
trains exactly as the trainer's own.

Also here: `prefill_dtype`, the activations' dtype the engine prefills in (float32 for a
bfloat16 model on a CPU without bfloat16 arithmetic, model/linear.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..dtypes import cpu_has_fast_bf16
from ..model.linear import Linear
from ..model.moe import DispatchState, LocalDispatcher, MoE, swiglu
from ..native import experts as native_experts
from ..native.swap import use_native
from ..quant import fp8, int8


def prefill_dtype(model: nn.Module) -> torch.dtype | None:
    """float32 where a bfloat16 model sits on a CPU whose bfloat16 GEMM is emulated, else None
    (the weights' dtype). Decode steps (a few rows) stay in the weights' dtype."""
    p = next(model.parameters())
    slow = p.device.type == "cpu" and p.dtype == torch.bfloat16 and not cpu_has_fast_bf16()
    return torch.float32 if slow else None


# ------------------------------------------------------------------------- routed experts
@torch.library.custom_op("dsv2::routed_experts", mutates_args=())
def routed_experts(x_MD: torch.Tensor, ends_E: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   s13: torch.Tensor | None, s2: torch.Tensor | None, block: list[int]) -> torch.Tensor:
    """SwiGLU experts over rows sorted by expert: rows [ends[e-1], ends[e]) belong to expert e.

    w13 [E, 2I, D] and w2 [E, D, I] are float (cast to x's dtype expert by expert where they
    differ), int8 rows with row scales s13 / s2 (quant/int8.py), or e4m3 with block scales
    (quant/fp8.py, `block` its block shape). On CPU, float weights in x's dtype and int8 ones take
    the native experts operators (native/experts.py: the experts shared out between the threads).
    Elsewhere float weights in x's dtype take torch's grouped matmul, which reads the offsets on
    the device; the others run expert by expert here, inside the operator, where reading the
    offsets on the host costs one sync that the graph around the call never sees."""
    if s13 is None and native_experts.can_run(x_MD, w13, w2):
        return native_experts.routed(x_MD, w13, w2, ends_E)
    if w13.dtype == torch.int8 and x_MD.device.type == "cpu" and int8.integer_products():
        return native_experts.routed_int8(x_MD, w13, s13, w2, s2, ends_E)
    if (s13 is None and w13.dtype == x_MD.dtype and hasattr(torch, "_grouped_mm")
            and x_MD.device.type not in _no_grouped_mm):
        try:
            offs = ends_E.to(torch.int32)
            gate, up = torch._grouped_mm(x_MD, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)
        except RuntimeError:   # e.g. a GPU without grouped GEMM kernels: the loop below, from now on
            _no_grouped_mm.add(x_MD.device.type)
    y_MD = torch.empty_like(x_MD)
    start = 0
    for e, end in enumerate(ends_E.tolist()):
        if end > start:
            x = x_MD[start:end]
            if s13 is None:
                y_MD[start:end] = swiglu(x, w13[e], w2[e])
            elif w13.dtype == torch.int8:
                y_MD[start:end] = int8.swiglu(x, w13[e], s13[e], w2[e], s2[e])
            else:
                y_MD[start:end] = swiglu(x, *fp8.widen_expert(w13[e], s13[e], w2[e], s2[e], tuple(block), x.dtype))
        start = end
    return y_MD


# Device types whose torch has no usable grouped GEMM for these weights (found on first use).
_no_grouped_mm: set[str] = set()


@routed_experts.register_fake
def _(x_MD, ends_E, w13, w2, s13, s2, block):
    return torch.empty_like(x_MD)


def _expert_weights(experts: nn.Module) -> tuple:
    """(w13, w2, s13, s2, block) of float, int8 or float8 stacked experts."""
    if isinstance(experts, int8.Int8GroupedExperts):
        return (experts.gate_up_proj_q, experts.down_proj_q, experts.gate_up_proj_s, experts.down_proj_s, [])
    if isinstance(experts, fp8.Fp8GroupedExperts):
        return (experts.gate_up_proj, experts.down_proj, experts.gate_up_proj_scale_inv,
                experts.down_proj_scale_inv, list(experts.block))
    return experts.gate_up_proj, experts.down_proj, None, None, []


class DecodeMoE(MoE):
    """MoE inference without host syncs: one sort of the token copies by expert, the routed
    experts as one operator over the sorted rows, and the same combine as the model's."""

    def forward(self, x_BTD: torch.Tensor, hooks=None) -> torch.Tensor:
        if (hooks is not None or self.training or torch.is_grad_enabled()
                or not isinstance(self.dispatcher, LocalDispatcher)):   # expert parallel: the model's path
            return super().forward(x_BTD, hooks)
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        route = self.gate(x_ND)
        K = route.idx_NK.shape[1]
        flat_M = route.idx_NK.flatten()
        order_M = flat_M.argsort(stable=True)
        ends_E = torch.searchsorted(flat_M[order_M], torch.arange(self.n_experts, device=x_ND.device), right=True)
        token_M = order_M // K
        y_MD = routed_experts(x_ND.index_select(0, token_M), ends_E, *_expert_weights(self.experts))
        out = self.dispatcher.combine(y_MD, DispatchState(order_M, token_M), route.weight_NK, x_ND.shape[0])
        if self.shared_experts is not None:
            out = out + self.shared_experts(x_ND)
        return out.view_as(x_BTD)


# ------------------------------------------------------------------------------- the head
class RowsHead(Linear):
    """The output head; on CPU, 2-128 rows (batched decode) as (W h^T)^T, which MKL runs faster."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        rows = h.numel() // h.shape[-1]
        if (h.device.type == "cpu" and 2 <= rows <= 128 and h.dtype == self.weight.dtype
                and self.bias is None and not torch.is_grad_enabled()):
            return torch.mm(self.weight, h.reshape(rows, -1).t()).t().contiguous().view(*h.shape[:-1], -1)
        return super().forward(h)


# -------------------------------------------------------------------------------- prepare
def _swap(parent: nn.Module, name: str, cls: type) -> None:
    """Replace parent.<name> by an instance of cls holding the same parameters, buffers and children."""
    old = getattr(parent, name)
    new = cls.__new__(cls)
    new.__dict__ = old.__dict__.copy()
    setattr(parent, name, new)


def prepare_for_decode(model: nn.Module) -> nn.Module:
    """Swap in the inference modules above (idempotent); returns the model."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is MoE:
                _swap(parent, name, DecodeMoE)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and not isinstance(head, RowsHead):
        _swap(model, "lm_head", RowsHead)
    return use_native(model)
