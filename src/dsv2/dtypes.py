"""The one dtype parser: every CLI, `load_pretrained`, `LLM` and the server take the same names.

Only the dtypes dsv2 is tested in are accepted by name; a torch.dtype passed from Python is
taken as given. torch is imported inside the function, so CLIs can list the names in
`--help` without importing it.
"""

from __future__ import annotations

import functools
from pathlib import Path

DTYPE_NAMES = ("float32", "bfloat16")
# The latent cache's formats (engine/cache.py): auto = the model's dtype.
KV_CACHE_DTYPES = ("auto", "bfloat16", "float32", "fp8", "int8", "mixed")
# Weight quantization for inference (dsv2.quant).
QUANTIZE = ("int8", "fp8")


def parse_dtype(value, what: str = "dtype"):
    """None -> None; a torch.dtype -> itself; 'float32' / 'bfloat16' -> that torch.dtype."""
    import torch
    if value is None or isinstance(value, torch.dtype):
        return value
    if value in DTYPE_NAMES:
        return getattr(torch, value)
    raise ValueError(f"unknown {what} {value!r}: use {' or '.join(DTYPE_NAMES)}.")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16. Without them (e.g. AVX2-only CPUs) bfloat16 matmuls are emulated: ~5x
    slower than float32 for torch's GEMM, ~100x for a training step's mix of kernels."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
