"""The training launcher: one process, a torchrun rank, or `--nproc N` processes, for any trainer.

    dsv2 pretrain --config tiny data.dir=runs/data                      # one process
    dsv2 pretrain --config tiny --nproc 4 --ep 2 data.dir=runs/data     # 4 processes on this machine
    torchrun --nproc-per-node 8 -m dsv2 pretrain --config small --ep 8  # under torchrun

It sits above the trainer (`dsv2.train`) and the parallel engine (`dsv2.distributed`), so
neither imports the other's entry point: the trainer is handed its parallel setup as the
seams of its constructor (see `dsv2.train.__doc__`). A verb uses it in three lines:

    add_arguments(parser)                                # --nproc, --ep, --ac, --meta-init, --fsdp-bf16
    ...
    return launch(args, cfg, Trainer, argv)              # Trainer(cfg, **seams).fit(resume=args.resume)

`trainer_cls` is any class built as `trainer_cls(cfg, **seams)` with a `fit(resume=)` that
returns a dict with `step` and `val_loss`, and whose `train_step(step)` returns the
scalars to report (`lm_loss`, `aux`): the pretraining Trainer, or a subclass with another
objective. The process that trains holds the run folder's lock (`dsv2.train.lock`), so a
second trainer on the same `out_dir` is refused with the holder's PID.

This module imports nothing heavy at the top: `dsv2 pretrain --help` stays fast.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def add_arguments(p) -> None:
    """The launcher's flags, in their own group of a verb's parser."""
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


def add_training_verb(sub, verb: str, run, help: str, description: str, config_help: str,
                      default_config: str, example: str):
    """A training verb's parser: KEY=VALUE overrides, --config, --resume, --print-config and the
    launcher's flags; `run(args)` resolves the config and calls `start(args, cfg, trainer_cls)`."""
    p = sub.add_parser(verb, help=help, description=description)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"dotted overrides, e.g. {example}")
    p.add_argument("--config", default=default_config, help=f"{config_help} (default {default_config})")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in out_dir, if any) or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def start(args, cfg, trainer_cls) -> int:
    """--print-config prints the resolved config; otherwise train it (`launch`)."""
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    return launch(args, cfg, trainer_cls)


def distributed_wanted(args, cfg=None) -> bool:
    """True when the run goes through dsv2.distributed: several processes, expert parallelism,
    activation checkpointing (parallelize() wraps the blocks, in one process too), or resuming a
    DCP checkpoint (e.g. one written by N processes, continued by one)."""
    return bool(getattr(args, "nproc", None) and args.nproc > 1) or int(os.environ.get("WORLD_SIZE", 1)) > 1 \
        or getattr(args, "ep", 1) > 1 or getattr(args, "ac", False) or _dcp_resume(getattr(args, "resume", None), cfg)


def _dcp_resume(where, cfg) -> bool:
    if not where:
        return False
    if where == "auto":
        if cfg is None:
            return False
        return any((p / ".metadata").exists() for p in (Path(cfg.out_dir) / "checkpoints").glob("step_*"))
    return (Path(where) / ".metadata").exists()


def relaunch(args, argv: list[str]) -> int:
    """Run `dsv2 <argv minus --nproc>` under torchrun with args.nproc processes; returns its exit code."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "dsv2", *rest]
    print("launching: " + " ".join(cmd[2:]), flush=True)
    return subprocess.call(cmd)


def launch(args, cfg, trainer_cls, argv: list[str] | None = None) -> int:
    """Train `cfg` with `trainer_cls` where the flags in `args` say; returns the exit code."""
    if getattr(args, "nproc", None) and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if args.ep < 1 or args.nproc % args.ep:
            raise ValueError(f"--ep {args.ep} must divide --nproc {args.nproc}; choose an EP size among "
                             f"{[d for d in range(1, args.nproc + 1) if args.nproc % d == 0]}.")
        return relaunch(args, argv if argv is not None else sys.argv[1:])   # the ranks take the lock
    from .train.lock import RunLock
    lock = RunLock(cfg.out_dir) if int(os.environ.get("RANK", 0)) == 0 else None
    if lock:
        lock.acquire()
    try:
        if distributed_wanted(args, cfg):
            from .distributed.launch import run
            return run(args, cfg, trainer_cls)
        result = trainer_cls(cfg).fit(resume=args.resume)
    finally:
        if lock:
            lock.release()
    val, base = result.get("val_loss"), result.get("unigram_val_loss")
    print(f"done: step {result['step']}, {result.get('tokens', 0):,} tokens"
          + (f", val loss {val:.4f} nats" if val is not None else "")
          + (f" (unigram baseline {base:.4f})" if base is not None else ""))
    return 0
