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
