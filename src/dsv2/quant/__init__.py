"""Weight quantization for inference: int8 rows (int8.py, CPU decoding) and DeepSeek's
block-scaled FP8 (fp8.py, also a checkpoint format). The latent cache's own formats live with
the cache (engine/cache.py).

    from dsv2.quant import quantize
    model = quantize(model, "fp8")     # or "int8", or None (unchanged)
"""

from __future__ import annotations

from torch import nn

from ..dtypes import QUANTIZE


def check_quantize(kind: str | None) -> str | None:
    if kind is not None and kind not in QUANTIZE:
        raise ValueError(f"unknown quantize {kind!r}: use {' or '.join(QUANTIZE)}, or leave it out.")
    return kind


def quantize(model: nn.Module, kind: str | None) -> nn.Module:
    """Quantize a loaded model in place: None, "int8" (per-row, CPU) or "fp8" (128 x 128
    block-scaled e4m3). Returns the model. (Loading from a checkpoint: load_pretrained(quantize=).)"""
    if check_quantize(kind) is None:
        return model
    if kind == "int8":
        from .int8 import quantize_int8
        return quantize_int8(model)
    from .fp8 import quantize_fp8
    return quantize_fp8(model)
