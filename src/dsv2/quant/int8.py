"""Weight-only int8 for CPU decoding: each weight row stored as int8 with one scale.

    W ~ diag(s) Q,   Q = round(W / s) in [-127, 127],   s_n = max_k |W_nk| / 127   (per output row)

Decoding a few tokens reads every weight once per step, so its speed is the bytes it reads:
int8 rows are a quarter of float32's. Both the fused decode step (native) and the int8 layers
here (torch.ops.dsv2.int8_mm, built with it) multiply the int8 rows by their inputs rounded to
int16, one scale per input row, with integer multiply-adds (VPDPWSSD with AVX512-VNNI,
VPMADDWD on AVX2), and apply the row scales to the sums: an error of at most 1/65534 of the
input row's largest magnitude, ~0.5% of what rounding the weights moves the logits by (tested).
The same operator runs a prompt's rows (prefill) at ~320 GFLOP/s on the project's Zen 4, where
widening the weights to float32 and multiplying gave 150-190. Without it (no C++ compiler, or a
CPU without AVX2): torch's `_weight_int8pack_mm` at decode sizes (bfloat16 inputs; it takes
widths that are a multiple of 32), otherwise the weights widened to the activations' dtype and
an ordinary matmul.

What is quantized: every nn.Linear except `kv_b_proj` (absorbed decoding uses its rows as
W^UK and W^UV directly), and the routed experts. What is not: embeddings, norms, the router.
The experts run one by one (float32 batched decode in PyTorch ops runs them all as one padded
bmm instead); `bench/generate.py --dtypes float32,int8` measures both. The error is that of
rounding each weight to 1/254 of its row's largest magnitude (a fraction of a percent of the
logits; tested).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import ExpertLoop, GroupedExperts

INT8_MAX_ROWS = 32


def quantize_rows(w: torch.Tensor, chunk: int = 4096, native: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (int8 [..., N, K], bf16 scales [..., N]), symmetric per row.

    On CPU the fused operator (native: torch.ops.dsv2.quantize_rows_int8) rounds the same
    way in one pass, ~10x faster; elsewhere, or with native=False, rows are rounded `chunk` at a
    time with PyTorch ops, so the float32 working copies stay small beside the weights (a
    102,400-row head would otherwise take three float32 copies of itself)."""
    if native is not False and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16, torch.float16):
        from .. import native as nat
        if nat.available(notice=False):
            return torch.ops.dsv2.quantize_rows_int8(w.detach())
    rows = w.detach().reshape(-1, w.shape[-1])
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(rows.shape[0], dtype=torch.bfloat16, device=w.device)
    for i in range(0, rows.shape[0], chunk):
        r = rows[i:i + chunk]
        s = (r.abs().amax(-1).float() / 127).clamp_min(1e-12).bfloat16()   # |w| and its max are exact in any dtype
        q[i:i + chunk] = torch.div(r, s.float()[:, None]).round_().clamp_(-127, 127)   # divides in float32
        scale[i:i + chunk] = s
    return q.view(w.shape), scale.view(w.shape[:-1])


def matmul(x_MK: torch.Tensor, q_NK: torch.Tensor, s_N: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (int8 rows q [N, K] x their scales s [N])^T, in x's dtype."""
    if x_MK.device.type == "cpu" and integer_products():
        return torch.ops.dsv2.int8_mm(x_MK.float().contiguous(), q_NK.contiguous(), s_N.float()).to(x_MK.dtype)
    # torch's kernel is taken only at widths that are a multiple of 32: on torch 2.13's AVX2 path
    # other widths returned wrong numbers or crashed (a width of 100 or 102, measured).
    if x_MK.device.type == "cpu" and x_MK.shape[0] <= INT8_MAX_ROWS and x_MK.shape[1] % 32 == 0:
        return torch._weight_int8pack_mm(x_MK.to(torch.bfloat16).contiguous(), q_NK, s_N).to(x_MK.dtype)
    return F.linear(x_MK, _widen(q_NK, s_N, x_MK.dtype))


_integer: bool | None = None


def integer_products() -> bool:
    """Whether dsv2's int8 operator (torch.ops.dsv2.int8_mm: inputs rounded to int16, integer
    multiply-adds) runs here: the native operators are built and the CPU has AVX2 or AVX-512."""
    global _integer
    if _integer is None:
        from .. import native as nat
        _integer = False
        if nat.available(notice=False):
            try:
                torch.ops.dsv2.int8_mm(torch.zeros(1, 32), torch.zeros(1, 32, dtype=torch.int8), torch.ones(1))
                _integer = True
            except RuntimeError:   # built without an integer path (no AVX2)
                pass
    return _integer


def _widen(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * s.to(dtype)[..., None]


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free layers (DeepSeek-V2 has no biases).")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = quantize_rows(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)

    @property
    def weight(self) -> torch.Tensor:
        """The rounded weights, widened (what this layer computes with)."""
        return _widen(self.qweight, self.scale, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = matmul(x.reshape(-1, self.in_features), self.qweight, self.scale)
        return y.view(*x.shape[:-1], self.out_features)


class Int8GroupedExperts(ExpertLoop):
    """The routed experts with int8 rows, run expert by expert, each through `matmul`."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.hidden = experts.hidden
        for name in ("gate_up_proj", "down_proj"):
            q, s = quantize_rows(getattr(experts, name))
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_s", s)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_up_proj_q[e], self.gate_up_proj_s[e], self.down_proj_q[e], self.down_proj_s[e])


def swiglu(x: torch.Tensor, q13: torch.Tensor, s13: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """One routed expert on rows x from its int8 rows and row scales (gate and up stacked in q13)."""
    x2 = x.reshape(-1, x.shape[-1])
    gate, up = matmul(x2, q13, s13).chunk(2, dim=-1)
    return matmul(F.silu(gate) * up, q2, s2).view(*x.shape[:-1], -1)


def quantized_weights(module: nn.Module):
    """(float weight's name, int8 rows, row scales) of one int8 module; nothing for any other."""
    if isinstance(module, Int8Linear):
        yield "weight", module.qweight, module.scale
    elif isinstance(module, Int8GroupedExperts):
        for name in ("gate_up_proj", "down_proj"):
            yield name, getattr(module, f"{name}_q"), getattr(module, f"{name}_s")


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace the model's matrices by int8 ones in place (inference only); returns the model."""
    if getattr(model, "quantized", None) not in (None, "int8"):
        raise ValueError(f"this model is already quantized ({model.quantized}); int8 starts from float weights.")
    if next(model.parameters()).device.type not in ("cpu", "meta"):   # meta: a checkpoint fills it
        raise ValueError("int8 weights are for CPU decoding; on a GPU use bfloat16.")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "kv_b_proj":
                setattr(parent, name, Int8Linear(child))
            elif type(child) is GroupedExperts:
                setattr(parent, name, Int8GroupedExperts(child))
    model.quantized = "int8"
    return model.eval()
