"""Block-scaled FP8 weights, in the format of DeepSeek's FP8 checkpoints.

    W[n, k] = Q[n, k] * S[n // 128, k // 128],   Q float8 e4m3 (|Q| <= 448),
    S = amax(block) / 448, stored beside the weight as `weight_scale_inv`

config.json then carries `quantization_config: {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}`. Edge blocks of a matrix
whose sides are not multiples of 128 are partial and get their own scale.

What is float8: every matrix of attention and of the FFNs and experts (`FP8_WEIGHTS`). What is
not: embeddings, norms, the router and the LM head, as in DeepSeek's checkpoints. At run time
`kv_b_proj` is widened to the model's dtype when loaded (absorbed decoding reads it per head
as W^UK and W^UV); a checkpoint keeps it in float8.

How it computes (no widened copy of the whole model is ever made):
- CPU decode: the fused decode step (native) reads the e4m3 bytes and block scales in
  its inner loop (one multiply per 128 products), with float32 activations.
- CPU prefill, or decode through PyTorch ops: one layer's weight is widened to the
  activations' dtype for the matmul that uses it, then dropped.
- GPU: torch._scaled_mm with the activations quantized per 1 x 128 block (`activation_scheme:
  dynamic`) where the card and torch support block scaling (sides multiples of 128); else the
  per-layer widening above, with a one-line notice.
"""

from __future__ import annotations

import re
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import ExpertLoop, GroupedExperts, swiglu

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = (128, 128)
QUANT_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}

# The dsv2 weights stored as float8 in an FP8 checkpoint.
FP8_WEIGHTS = re.compile(r"^layers\.\d+\.(self_attn\.\w+_proj\w*\.weight"
                         r"|mlp\.(shared_experts\.)?(gate|up|down)_proj\.weight"
                         r"|mlp\.experts\.(gate_up|down)_proj)$")


def _blocks(n: int, b: int) -> int:
    return -(-n // b)


def scale_shape(shape: tuple[int, ...], block=BLOCK) -> tuple[int, ...]:
    """The block scales' shape for a weight of `shape` ([..., N, K])."""
    return (*shape[:-2], _blocks(shape[-2], block[0]), _blocks(shape[-1], block[1]))


def quantize_blocks(w: torch.Tensor, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (e4m3 [..., N, K], float32 scales [..., ceil(N/bn), ceil(K/bk)])."""
    bn, bk = block
    *lead, N, K = w.shape
    pn, pk = (-N) % bn, (-K) % bk
    x = F.pad(w.detach().float(), (0, pk, 0, pn)).view(*lead, (N + pn) // bn, bn, (K + pk) // bk, bk)
    s = (x.abs().amax(dim=(-3, -1)) / FP8_MAX).clamp_min(1e-12)
    q = (x / s[..., None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(*lead, N + pn, K + pk)[..., :N, :K].contiguous(), s


def dequantize_blocks(q: torch.Tensor, s: torch.Tensor, block=BLOCK, dtype=torch.float32) -> torch.Tensor:
    """e4m3 [..., N, K] with scales [..., ceil(N/bn), ceil(K/bk)] -> dtype [..., N, K]."""
    N, K = q.shape[-2:]
    full = s.repeat_interleave(block[0], -2)[..., :N, :].repeat_interleave(block[1], -1)[..., :K]
    return (q.float() * full).to(dtype)


def quantize_stacked(w: torch.Tensor, split: int, block=BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, 2I, D] gate-over-up stacks (split = I): each half blocked on its own, scales
    [E, blocks(I) + blocks(I), blocks(D)], as the checkpoint's per-expert gate and up matrices are."""
    qa, sa = quantize_blocks(w[..., :split, :], block)
    qb, sb = quantize_blocks(w[..., split:, :], block)
    return torch.cat([qa, qb], -2), torch.cat([sa, sb], -2)


def dequantize_stacked(q, s, split: int, block=BLOCK, dtype=torch.float32) -> torch.Tensor:
    nb = _blocks(split, block[0])
    return torch.cat([dequantize_blocks(q[..., :split, :], s[..., :nb, :], block, dtype),
                      dequantize_blocks(q[..., split:, :], s[..., nb:, :], block, dtype)], -2)


# ----------------------------------------------------------------------------- modules
class _KeepsFp8(nn.Module):
    """Device moves apply to the e4m3 codes and their float32 scales; dtype casts (`.to(dtype)`,
    `.bfloat16()`) do not: they would turn the codes into plain floats and round the scales."""

    def _apply(self, fn, recurse=True):   # these modules hold buffers only
        for key, buf in self._buffers.items():
            if buf is not None:
                probe = fn(torch.empty(0, device=buf.device))   # what fn does to a float32 tensor
                self._buffers[key] = buf.to(probe.device) if probe.dtype != torch.float32 else fn(buf)
        return self


class Fp8Linear(_KeepsFp8):
    """A bias-free linear layer holding `weight` (e4m3) and `weight_scale_inv` (its block scales)."""

    def __init__(self, in_features: int, out_features: int, block=BLOCK, device=None):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8, device=device))
        self.register_buffer("weight_scale_inv", torch.empty(scale_shape((out_features, in_features), block),
                                                             dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, block=BLOCK) -> "Fp8Linear":
        if linear.bias is not None:
            raise ValueError("Fp8Linear takes bias-free layers (DeepSeek-V2 has no biases).")
        m = cls(linear.in_features, linear.out_features, block, linear.weight.device)
        if linear.weight.device.type != "meta":
            q, s = quantize_blocks(linear.weight, block)
            m.weight.copy_(q)
            m.weight_scale_inv.copy_(s)
        return m

    def widened(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            y = _gpu_mm(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv, self.block)
            if y is not None:
                return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.widened(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3 in {self.block} blocks"


class Fp8GroupedExperts(_KeepsFp8, ExpertLoop):
    """The routed experts in e4m3: `gate_up_proj` [E, 2I, D] (gate and up blocked apart) and
    `down_proj` [E, D, I], each with `*_scale_inv` block scales. Run expert by expert, each
    expert's weights widened for its matmul."""

    def __init__(self, n_experts: int, dim: int, hidden: int, block=BLOCK, device=None):
        super().__init__()
        self.hidden, self.block = hidden, tuple(block)
        self.register_buffer("gate_up_proj", torch.empty(n_experts, 2 * hidden, dim, dtype=FP8, device=device))
        self.register_buffer("gate_up_proj_scale_inv", torch.empty(
            n_experts, 2 * _blocks(hidden, block[0]), _blocks(dim, block[1]), device=device))
        self.register_buffer("down_proj", torch.empty(n_experts, dim, hidden, dtype=FP8, device=device))
        self.register_buffer("down_proj_scale_inv", torch.empty(scale_shape((n_experts, dim, hidden), block),
                                                                device=device))

    @classmethod
    def from_experts(cls, ex: GroupedExperts, block=BLOCK) -> "Fp8GroupedExperts":
        E, two_i, D = ex.gate_up_proj.shape
        m = cls(E, D, two_i // 2, block, ex.gate_up_proj.device)
        if ex.gate_up_proj.device.type != "meta":
            for name, (q, s) in (("gate_up_proj", quantize_stacked(ex.gate_up_proj, two_i // 2, block)),
                                 ("down_proj", quantize_blocks(ex.down_proj, block))):
                getattr(m, name).copy_(q)
                getattr(m, f"{name}_scale_inv").copy_(s)
        return m

    def widened(self, e: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (gate_up [2I, D], down [D, I]) in dtype."""
        return widen_expert(self.gate_up_proj[e], self.gate_up_proj_scale_inv[e], self.down_proj[e],
                            self.down_proj_scale_inv[e], self.block, dtype)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, *self.widened(e, x.dtype))


def widen_expert(q13: torch.Tensor, s13: torch.Tensor, q2: torch.Tensor, s2: torch.Tensor, block,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's e4m3 stacks and block scales -> (gate_up [2I, D], down [D, I]) in dtype; gate
    and up are blocked apart (quantize_stacked)."""
    hidden = q2.shape[-1]
    return (dequantize_stacked(q13, s13, hidden, block, dtype), dequantize_blocks(q2, s2, block, dtype))


def to_fp8(model: nn.Module, block=BLOCK) -> nn.Module:
    """Replace the model's FP8_WEIGHTS matrices (but kv_b_proj) by float8 ones in place: quantized
    from their values, or left empty on the meta device (for a checkpoint to fill). Returns the model."""
    names = {n for n, _ in model.named_parameters()}
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.Linear) and name != "kv_b_proj" and FP8_WEIGHTS.match(f"{full}.weight") \
                    and f"{full}.weight" in names:
                setattr(parent, name, Fp8Linear.from_linear(child, block))
            elif type(child) is GroupedExperts:
                setattr(parent, name, Fp8GroupedExperts.from_experts(child, block))
    model.fp8_block = tuple(block)
    model.quantized = "fp8"
    return model.eval()


@torch.no_grad()
def quantize_fp8(model: nn.Module, block=BLOCK) -> nn.Module:
    """Quantize a float model's matrices to block-scaled e4m3 in place (inference); returns the model."""
    if getattr(model, "quantized", None):
        if model.quantized == "fp8":
            return model
        raise ValueError(f"this model is already quantized ({model.quantized}); load the float or FP8 checkpoint instead.")
    return to_fp8(model, block)


def float_weights(model: nn.Module, fp8: bool, block=BLOCK):
    """The model's state as checkpoint tensors: (dsv2 name, tensor, block scales or None). fp8:
    FP8_WEIGHTS as e4m3 (float8 modules as stored, others quantized); else every weight as a
    float in the model's dtype (float8 modules widened)."""
    state = model.state_dict()
    dtype = next((t.dtype for t in state.values() if t.is_floating_point() and t.dtype != FP8), torch.float32)
    for name, t in state.items():
        if name.endswith("_scale_inv"):
            continue
        s = state.get(f"{name}_scale_inv")
        stacked = name.endswith("experts.gate_up_proj")
        split = t.shape[-2] // 2 if stacked else None
        if s is not None and not fp8:
            t, s = (dequantize_stacked(t, s, split, block, dtype) if stacked
                    else dequantize_blocks(t, s, block, dtype)), None
        elif s is None and fp8 and FP8_WEIGHTS.match(name):
            t, s = quantize_stacked(t, split, block) if stacked else quantize_blocks(t, block)
        yield name, t, s


_gpu = {"layout": None, "off": False}   # the scale layout this GPU's _scaled_mm was checked with


def _gpu_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor | None:
    """x [M, K] @ W^T by torch._scaled_mm: x quantized per 1 x 128 block, W's 128 x 128 block
    scales. None where this card or torch cannot (then the caller widens the layer).

    The first call tries the scale layouts torch versions have asked for and keeps the first whose
    result matches the widened matmul (relative error under 10%: activations rounded to e4m3
    add ~3%), so a layout this code has not met can never give wrong numbers silently."""
    (N, K), (bn, bk) = q.shape, block
    if _gpu["off"] or (bn, bk) != (128, 128) or K % 128 or N % 128:
        return None
    M = x.shape[0]
    xb = x.float().view(M, K // 128, 128)
    sx = (xb.abs().amax(-1) / FP8_MAX).clamp_min(1e-12)                 # [M, K/128]
    xq = (xb / sx[..., None]).view(M, K).to(FP8)
    layouts = [_gpu["layout"]] if _gpu["layout"] is not None else [(a, b) for a in (0, 1) for b in (0, 1)]
    why = "no scale layout gave the widened result"
    for a, b in layouts:
        sa = sx.t().contiguous().t() if a else sx.contiguous()            # M-major or K-major
        sb = s.t() if b else s.t().contiguous()                           # [K/128, N/128], either major
        try:
            y = torch._scaled_mm(xq, q.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        except (RuntimeError, NotImplementedError) as e:
            why = str(e).splitlines()[0][:100]
            continue
        if _gpu["layout"] is None:
            ref = x.float() @ dequantize_blocks(q, s, block).t()
            if (y.float() - ref).norm() > 0.1 * ref.norm():
                continue
            _gpu["layout"] = (a, b)
        return y
    _gpu["off"] = True
    print(f"dsv2: FP8 block-scaled matmul unavailable on this GPU ({why}); widening each layer's weights "
          "instead.", file=sys.stderr)
    return None
