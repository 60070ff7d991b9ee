"""Weight quantization for inference: int8 rows (int8.py, CPU decoding) and DeepSeek's
block-scaled FP8 (fp8.py, also a checkpoint format). The latent cache's own formats live with
the cache (engine/cache.py).

    from dsv2.quant import quantize
    model = quantize(model, "fp8")     # or "int8", or None (unchanged)
"""

from __future__ import annotations

from torch import nn

from ..dtypes import QUANTIZE


def quantize(model: nn.Module, kind: str | None) -> nn.Module:
    """The one entry point of LLM, the server and the CLIs: None, "int8" (per-row, CPU) or "fp8"
    (128 x 128 block-scaled e4m3). Returns the model (quantized in place)."""
    if kind is None:
        return model
    if kind == "int8":
        from .int8 import quantize_int8
        return quantize_int8(model)
    if kind == "fp8":
        from .fp8 import quantize_fp8
        return quantize_fp8(model)
    raise ValueError(f"unknown quantize {kind!r}: use {' or '.join(QUANTIZE)}, or leave it out.")
