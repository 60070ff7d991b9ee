"""The `dsv2` command line: one tool, one verb per job.

    dsv2 info --preset deepseek-v2            parameters, FLOPs and KV-cache bytes of a config
    dsv2 convert SRC DST --dtype bfloat16     rewrite a checkpoint as a Hugging Face directory
    dsv2 demo                                 the main job on its embedded default (see README)

Each verb lives in its own module and registers itself through `VERBS`, so this file stays
small: a verb's module defines `add_parser(subparsers)` which sets `func` on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

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
    p.set_defaults(func=_info)


def _info(args) -> int:
    import torch

    from .config import ModelConfig, list_presets
    from .dtypes import parse_dtype
    from .model import DeepseekV2
    if args.list:
        print("\n".join(list_presets()))
        return 0
    cfg = ModelConfig.from_preset(args.preset) if args.preset else ModelConfig.from_json(args.model)
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    print(model.summary(parse_dtype(args.dtype)))
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="write a checkpoint as a Hugging Face directory",
                       description="Load SRC (a Hugging Face DeepSeek-V2 directory) and write it to DST in the "
                                   "layout transformers loads, optionally in another dtype or shard size.")
    p.add_argument("src")
    p.add_argument("dst")
    add_dtype(p, meaning="keep the source's")
    p.add_argument("--shard-gb", type=float, default=5.0, help="maximum shard size in GB (default 5)")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from .checkpoint import load_pretrained, save_pretrained
    from .tokenizer import Tokenizer
    model = load_pretrained(args.src, dtype=args.dtype)
    tok_dir = args.src if _has_tokenizer(args.src) else None
    if tok_dir:
        Tokenizer(tok_dir).check_fits(model.config.vocab_size)
    save_pretrained(model, args.dst, tokenizer_dir=tok_dir, max_shard_bytes=int(args.shard_gb * 2**30))
    print(f"wrote {args.dst} ({model.num_params():,} parameters)")
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
