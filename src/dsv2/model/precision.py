"""float32 matmuls for bfloat16 weights, on CPUs without bfloat16 arithmetic.

Without AVX512-BF16 or AMX, torch's bfloat16 GEMM on CPU runs ~5x slower than float32: on the
project's AVX2 machine a [512, 512] x [512, 1024] product took 33.7 ms in bfloat16, 6.4 ms in
float32, and 5.3 ms widening both operands to float32 first. So inference forwards over many
tokens (the engine's prefill) run under `float32_matmuls()`, where the model's `Linear` layers,
routed experts and attention widen their bfloat16 operands to float32 and round the result
back to bfloat16: the same sums a bfloat16 GEMM accumulates in float32, rounded once at the
end. Widening costs ~18/T of the GEMM for T rows, so it applies from MIN_ROWS rows up; decode
steps (a few rows) are left alone. Nothing changes under autograd (training keeps its autocast).
"""

from __future__ import annotations

import contextlib
import functools
import contextvars
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 64
_ON = contextvars.ContextVar("dsv2_float32_matmuls", default=False)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16. Without them (e.g. AVX2-only CPUs) bfloat16 matmuls are emulated: ~5x
    slower than float32 for torch's GEMM, ~100x for a training step's mix of kernels."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@contextlib.contextmanager
def float32_matmuls(enabled: bool = True):
    token = _ON.set(enabled)
    try:
        yield
    finally:
        _ON.reset(token)


def widen(x: torch.Tensor) -> bool:
    """Whether a matmul over x (rows along all but the last dim) should run in float32 here."""
    return (_ON.get() and x.dtype == torch.bfloat16 and not torch.is_grad_enabled()
            and x.numel() >= MIN_ROWS * x.shape[-1])


class Linear(nn.Linear):
    """nn.Linear that computes in float32 under `float32_matmuls()` (same parameters, same keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if widen(x):
            b = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), b).to(x.dtype)
        return super().forward(x)
