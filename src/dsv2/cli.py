"""The `dsv2` command line: one tool, one verb per job.

    dsv2 info --preset deepseek-v2            parameters, FLOPs and KV-cache bytes of a config
    dsv2 info --preset deepseek-v2 --kv-cache-dtype fp8 --compare-mha   ... in a cache format, beside GQA / MHA
    dsv2 info --model DIR --quantize int8 --max-len 4096 --slots 8       ... and the memory pre-flight
    dsv2 convert SRC DST --dtype bfloat16     rewrite a checkpoint as a Hugging Face directory (--dtype fp8:
                                              DeepSeek's block-scaled FP8 format)
    dsv2 demo                                 the main job on its embedded default (see README)

Each verb lives in its own module and registers itself through `VERBS`, so this file stays
small: a verb's module defines `add_parser(subparsers)` which sets `func` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .dtypes import KV_CACHE_DTYPES, QUANTIZE
from .options import add_dtype

# verb -> module defining add_parser(subparsers). Order is the order of `dsv2 --help`.
VERBS = {
    "info": "dsv2.cli",
    "convert": "dsv2.cli",
    "demo": "dsv2.demo",
    "tokenizer": "dsv2.data.bpe",
    "data": "dsv2.data.shards",
    "pretrain": "dsv2.pretrain",
    "sft": "dsv2.align.cli",
    "grpo": "dsv2.align.cli",
    "rm": "dsv2.align.cli",
    "export": "dsv2.distributed.cli",
    "plot": "dsv2.train.plot",
    "serve": "dsv2.serve.cli",
    "generate": "dsv2.engine.cli",
    "chat": "dsv2.engine.cli",
    "bench": "dsv2.bench.generate",
    "eval": "dsv2.eval.cli",
}


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="print parameters, FLOPs per token and KV-cache bytes of a config",
                       description="Accounting for a preset or a checkpoint, built on the meta device (no memory).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name (see `--list`)")
    src.add_argument("--model", help="a Hugging Face checkpoint directory")
    src.add_argument("--list", action="store_true", help="list the presets")
    add_dtype(p, default="bfloat16")   # the KV-cache bytes' dtype
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="count the KV cache in this format (engine/cache.py; default: --dtype)")
    p.add_argument("--compare-mha", action="store_true",
                   help="also print the KV bytes per token beside DeepSeek 67B's GQA cache and an MHA cache "
                        "of this model's own heads, in every cache format (the paper's comparison)")
    plan = p.add_argument_group("memory pre-flight (with --model): what loading and serving it takes, against "
                                "the memory available now")
    plan.add_argument("--quantize", choices=QUANTIZE, default=None, help="int8 or fp8 weights (as generate/serve)")
    plan.add_argument("--max-len", type=int, default=4096, help="positions per sequence in the cache (default 4096)")
    plan.add_argument("--slots", type=int, default=1, help="sequences held at once (default 1)")
    p.set_defaults(func=_info)


def _info(args) -> int:
    import torch

    from .config import ModelConfig, list_presets
    from .dtypes import parse_dtype
    from .model import DeepseekV2
    if args.list:
        print("\n".join(list_presets()))
        return 0
    from .engine.cache import bytes_per_token
    cfg = ModelConfig.from_preset(args.preset) if args.preset else ModelConfig.from_json(args.model)
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    dtype = parse_dtype(args.dtype)
    kv = args.kv_cache_dtype if args.kv_cache_dtype not in (None, "auto") else args.dtype
    print(model.summary(dtype, kv_cache=(bytes_per_token(cfg, kv, dtype), kv)))
    if args.compare_mha:
        print(_kv_table(cfg))
    if args.model:
        from .engine.memory import plan_memory
        print(plan_memory(args.model, dtype, args.quantize, args.max_len, args.slots, args.kv_cache_dtype).table())
    return 0


# DeepSeek 67B's attention (the paper's baseline): 95 layers, GQA with 8 KV heads of 128.
GQA_67B = dict(layers=95, kv_heads=8, head_dim=128)


def _kv_table(cfg) -> str:
    """The paper's KV-cache comparison with this config's numbers: elements and bytes per token."""
    from .engine.cache import bytes_per_token, kv_format
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    mla = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L
    gqa = 2 * GQA_67B["kv_heads"] * GQA_67B["head_dim"] * GQA_67B["layers"]
    mha = H * (cfg.qk_head_dim + cfg.v_head_dim) * L
    formats = ["bfloat16", "fp8", "int8"] + (["mixed"] if cfg.kv_lora_rank % 32 == 0 else [])
    bits = {f: bytes_per_token(cfg, f) * 8 / mla for f in formats}
    rows = [("DeepSeek 67B: GQA, 95 layers x 2 x 8 heads x 128", gqa, {"bfloat16": 2 * gqa, "fp8": gqa}),
            (f"MHA of these heads: {L} layers x {H} x ({cfg.qk_head_dim} + {cfg.v_head_dim})", mha,
             {"bfloat16": 2 * mha, "fp8": mha}),
            (f"MLA (this model): {L} layers x ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim})", mla,
             {f: bytes_per_token(cfg, f) for f in formats})]
    head = f"{'KV cache per token':<58}{'elements':>11}" + "".join(
        f"{f + (' (%.2f b)' % bits[f] if f == 'mixed' else ''):>20}" for f in formats)
    lines = [head]
    for name, n, b in rows:
        lines.append(f"{name:<58}{n:>11,}" + "".join(f"{b[f]:>20,}" if f in b else f"{'-':>20}" for f in formats))
    base = 2 * gqa
    lines.append("MLA vs DeepSeek 67B's bf16 cache: " + ", ".join(
        f"{f} {bytes_per_token(cfg, f) / base:.1%} ({bytes_per_token(cfg, f) / base - 1:+.1%})" for f in formats))
    mixed = kv_format("mixed", cfg) if "mixed" in formats else None
    if mixed is not None:
        lines.append(f"mixed = c^KV in 4 bits with a bfloat16 scale per 32, k^R in bfloat16: {mixed.row_bytes()} bytes "
                     f"per layer for {cfg.kv_lora_rank + cfg.qk_rope_head_dim} numbers = {mixed.bits_per_element():.2f} "
                     "bits/element, scales included")
    return "\n".join(lines)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a checkpoint as a Hugging Face directory",
                       description="Load SRC (a Hugging Face DeepSeek-V2 directory) and write it to DST in the "
                                   "layout transformers loads, optionally in another dtype or shard size.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "fp8"], default=None,
                   help="float32 | bfloat16 | fp8: DeepSeek's block-scaled e4m3 format (quant/fp8.py), the rest "
                        "in the source's dtype (default: keep the source's, an FP8 source staying FP8)")
    p.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GB (default 5)")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from .checkpoint import fp8_block_size, load_pretrained, save_pretrained
    from .tokenizer import Tokenizer
    fp8 = args.dtype == "fp8" or (args.dtype is None and fp8_block_size(args.src) is not None)
    model = load_pretrained(args.src, dtype=None if args.dtype == "fp8" else args.dtype,
                            quantize="fp8" if fp8 else None)
    tok_dir = args.src if _has_tokenizer(args.src) else None
    if tok_dir:
        Tokenizer(tok_dir).check_fits(model.config.vocab_size)
    save_pretrained(model, args.dst, tokenizer_dir=tok_dir, max_shard_bytes=int(args.shard_gb * 2**30), fp8=fp8)
    print(f"wrote {args.dst} ({model.num_params():,} parameters{', fp8 matrices' if fp8 else ''})")
    return 0


def _has_tokenizer(path) -> bool:
    from pathlib import Path
    return (Path(path) / "tokenizer.json").exists()


def add_parser(sub) -> None:
    """The verbs defined in this file."""
    _add_info(sub)
    _add_convert(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2 in plain PyTorch: load, train, generate, serve.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    seen = set()
    for module in VERBS.values():
        if module not in seen:
            seen.add(module)
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, KeyError) as e:
        # Our errors are one sentence naming the problem; show it without a traceback.
        print(f"dsv2 {args.verb}: error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    """`python -m dsv2` and the `dsv2` script. A torchrun rank leaves through exit_rank (see there)."""
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from .distributed.mesh import exit_rank
        exit_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
