"""Command-line options shared by several verbs, defined once (argparse, no torch import).

    add_dtype(p)             --dtype float32 | bfloat16          (generate, chat, serve, convert, export, info)
    add_runtime(p)           --threads, --compile, --quantize, --kv-cache-dtype, --native / --no-native
                                                                 (generate, chat, serve)
    add_native(p)            --native / --no-native alone        (bench, which sets its own threads and dtypes)
"""

from __future__ import annotations

import argparse

from .dtypes import DTYPE_NAMES, KV_CACHE_DTYPES, QUANTIZE


def add_dtype(p, default: str | None = None, meaning: str = "the checkpoint's") -> None:
    p.add_argument("--dtype", default=default, choices=DTYPE_NAMES,
                   help=f"{' | '.join(DTYPE_NAMES)} (default: {default or meaning})")


def add_native(p) -> None:
    p.add_argument("--native", action=argparse.BooleanOptionalAction, default=None,
                   help="decode through the fused CPU step (native); --no-native: PyTorch ops "
                        "(default: fused where it can be built)")


def add_runtime(p, threads_default: int | None = None) -> None:
    g = p.add_argument_group("runtime (how the engine runs, not what it generates)")
    g.add_argument("--threads", type=int, default=threads_default,
                   help="torch threads (default: " + (str(threads_default) if threads_default else "torch's") + ")")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (opt-in)")
    g.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="int8: weight-only int8 rows (quant/int8.py); fp8: e4m3 in 128x128 blocks "
                        "(quant/fp8.py; an FP8 checkpoint loads as stored)")
    g.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="the latent cache's format: auto (the model's dtype), bfloat16, float32, fp8, int8, "
                        "or mixed (~5.8 bits: 4-bit c^KV, bfloat16 k^R); see docs/deployment.md")
    add_native(g)
