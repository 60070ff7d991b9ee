"""The distributed flags of `dsv2 pretrain` (kept free of torch imports: `--help` stays fast).

    dsv2 pretrain --config tiny --nproc 4 --ep 2 data.dir=runs/data
    torchrun --nproc-per-node 4 -m dsv2 pretrain --config tiny --ep 2 data.dir=runs/data
"""

from __future__ import annotations

import os
from pathlib import Path


def add_arguments(p) -> None:
    g = p.add_argument_group("distributed (torch.distributed: FSDP2 + expert parallelism; see docs/distributed.md)")
    g.add_argument("--nproc", type=int, default=None,
                   help="start N processes on this machine (re-runs this command under torchrun)")
    g.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size: ranks the routed experts are spread over (divides the process count)")
    g.add_argument("--ac", action="store_true", help="activation checkpointing of every block")
    g.add_argument("--meta-init", action="store_true",
                   help="build the model on the meta device and allocate only each rank's shards (big models); "
                        "weights are then drawn per shard, not as one process would draw them")
    g.add_argument("--fsdp-bf16", action="store_true",
                   help="FSDP2 mixed precision: bf16 parameters for compute and all-gathers, fp32 reductions")


def wanted(args, cfg=None) -> bool:
    """True when this `dsv2 pretrain` should run through dsv2.distributed.launch: several
    processes, expert parallelism, or resuming a DCP checkpoint (e.g. one written by N
    processes, continued by one)."""
    return bool(getattr(args, "nproc", None) and args.nproc > 1) or int(os.environ.get("WORLD_SIZE", 1)) > 1 \
        or getattr(args, "ep", 1) > 1 or _dcp_resume(getattr(args, "resume", None), cfg)


def _dcp_resume(where, cfg) -> bool:
    if not where:
        return False
    if where == "auto":
        if cfg is None:
            return False
        return any((p / ".metadata").exists() for p in (Path(cfg.out_dir) / "checkpoints").glob("step_*"))
    return (Path(where) / ".metadata").exists()


def run(args, cfg) -> int:
    from .launch import run as launch_run
    return launch_run(args, cfg)


def add_parser(sub) -> None:
    """`dsv2 export`: a DCP checkpoint (written by any number of processes) -> Hugging Face directory."""
    p = sub.add_parser("export", help="write a DCP training checkpoint as a Hugging Face directory",
                       description="Read a checkpoint written by `dsv2 pretrain` on any number of processes "
                                   "(a step_* directory, or the checkpoints/ folder for the newest step) and write "
                                   "config.json + safetensors that transformers and `dsv2 generate` load. "
                                   "Runs in one process.")
    p.add_argument("checkpoint", help="runs/x/checkpoints/step_00000100 or runs/x/checkpoints")
    p.add_argument("out", help="output directory")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32, as trained)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: the training data's)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    import json

    import torch

    from ..train.config import from_dict
    from .checkpoint import DCPCheckpointer, export_hf
    path = Path(args.checkpoint)
    if not (path / ".metadata").exists():
        path = DCPCheckpointer(path).latest()
        if path is None:
            raise FileNotFoundError(f"no DCP checkpoint (step_*/.metadata) at or under {args.checkpoint}.")
    meta = json.loads((path / "state.json").read_text()).get("meta", {})
    if "config" not in meta:
        raise ValueError(f"{path}/state.json has no training config: it was not written by `dsv2 pretrain`.")
    cfg = from_dict(meta["config"])
    tok = args.tokenizer
    if tok is None:
        card = Path(cfg.data.dir) / "card.json"
        tok = json.loads(card.read_text()).get("tokenizer") if card.exists() else None
    tok = tok if tok and (Path(tok) / "tokenizer.json").exists() else None
    out = export_hf(path, cfg.model_config(), args.out, getattr(torch, args.dtype) if args.dtype else None, tok)
    print(f"wrote {out} from {path}" + (f" with the tokenizer of {tok}" if tok else ""))
    return 0
