"""One rank of a distributed training run: the layout, the trainer's seams, export from the ranks.

    torchrun --nproc-per-node 4 -m dsv2 pretrain --config tiny --ep 2 data.dir=runs/data      # 1 machine
    dsv2 pretrain --config tiny --nproc 4 --ep 2 data.dir=runs/data                           # same, CPU/GPU
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             -m dsv2 pretrain --config my.yaml --ep 8                                         # 2 machines

`dsv2.launch` starts the processes (`--nproc N` re-runs the command under
`python -m torch.distributed.run --standalone`) and hands this module the trainer class.
Under torchrun every process builds the same model, and the single-process trainer
(dsv2.train) runs unchanged through its seams:

    parallelize     dsv2.distributed.parallelize (EP, checkpointing, compile, FSDP2)
    count_targets   all_reduce SUM: every rank divides its CE by the GLOBAL target count
    grad_scale      1: parallelize() makes FSDP2 sum gradients instead of averaging
    clip_grad_norm  one norm over gradients living on different meshes
    checkpointer    DCPCheckpointer (sharded, reshardable)
    dp_rank/size    every process is a data-parallel rank (EP borrows from them)

Batch sizes in the config (`batch.start`, `batch.final`) are GLOBAL sequences per step;
`batch.micro_batch` is per rank. The step line and metrics report global losses, balance
losses and drop rates (all-reduced); tokens and tok/s are per rank.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import torch.distributed as dist

from ..checkpoint import save_pretrained
from .checkpoint import DCPCheckpointer
from .grad_norm import clip_grad_norm_
from .memory import describe
from .mesh import Layout, init_layout, log0, seed_rank, shutdown
from .parallelize import parallelize


def run(args, cfg, trainer_cls) -> int:
    """Be one rank of a torchrun job (or the one process of an EP-1 / DCP run) training `trainer_cls`."""
    layout = init_layout(args.ep, device=None if cfg.device == "auto" else cfg.device)
    try:
        result = train(cfg, layout, trainer_cls, resume=args.resume, activation_checkpointing=args.ac,
                       param_dtype=torch.bfloat16 if args.fsdp_bf16 else None, meta_init=args.meta_init)
        val = result["val_loss"]
        log0(f"done: step {result['step']}" + (f", val loss {val:.4f} nats" if val is not None else ""), layout=layout)
    finally:
        shutdown()
    return 0


def per_rank_config(cfg, layout: Layout):
    """Global batch sizes -> this rank's; checks that they divide."""
    b, W = cfg.batch, layout.world
    for name in ("start", "final"):
        n = getattr(b, name)
        if n % (W * b.micro_batch):
            raise ValueError(f"batch.{name}={n} sequences must be a multiple of processes x batch.micro_batch "
                             f"({W} x {b.micro_batch}); change it or batch.micro_batch.")
        setattr(b, name, n // W)
    b.ramp_tokens //= W
    return cfg


class GlobalScalars:
    """Mixed in front of a single-process trainer: each step's reported scalars made global (all-reduced).

    Only what is printed and written to metrics changes: the LM loss (each rank holds its
    share of the global mean, so shares add up), the balance losses (per-rank means over
    equal numbers of sequences, so they are averaged) and the drop counters.
    """

    def __init__(self, cfg, layout: Layout, **kwargs):
        self.layout = layout
        super().__init__(cfg, **kwargs)

    def train_step(self, step: int) -> dict:
        d0, c0 = self.rules.dropped, self.rules.copies
        out = super().train_step(step)
        if not self.layout.distributed:
            return out
        keys = sorted(out["aux"])
        local = [out["lm_loss"]] + [out["aux"][k] for k in keys] + [self.rules.dropped - d0, self.rules.copies - c0]
        t = torch.tensor(local, dtype=torch.float64, device=self.layout.device)
        dist.all_reduce(t)
        vals = t.tolist()
        out["lm_loss"] = vals[0]
        out["aux"] = {k: v / self.layout.world for k, v in zip(keys, vals[1:])}
        self.rules.dropped, self.rules.copies = d0 + int(vals[-2]), c0 + int(vals[-1])
        return out


def distributed(trainer_cls: type) -> type:
    """trainer_cls with its reported scalars all-reduced (GlobalScalars first in the MRO)."""
    return type(f"Distributed{trainer_cls.__name__}", (GlobalScalars, trainer_cls), {})


def train(cfg, layout: Layout, trainer_cls: type, resume: str | None = None, activation_checkpointing: bool = False,
          param_dtype: torch.dtype | None = None, meta_init: bool = False) -> dict:
    """Run `trainer_cls` as one rank of `layout` (or as one plain process), handed its parallel
    setup through the constructor's seams; returns fit()'s result."""
    compile_blocks = cfg.compile
    cfg.compile = False               # compiled per block inside parallelize(), inside the FSDP hooks
    export = cfg.export and layout.distributed
    if layout.distributed:
        cfg.export = False            # export needs every rank (parameters are sharded); done below
    global_batch = dataclasses.replace(cfg.batch)
    per_rank_config(cfg, layout)
    mcfg = cfg.model_config()
    log0(describe(mcfg, layout.dp, layout.ep, cfg.batch.micro_batch * cfg.data.seq_len,
                  2 if cfg.precision == "bf16" or param_dtype else 4, activation_checkpointing), layout=layout)

    def parallelize_then_seed(model):
        model = parallelize(model, layout, activation_checkpointing=activation_checkpointing, compile=compile_blocks,
                            param_dtype=param_dtype)
        if meta_init:                 # built on "meta": allocate only this rank's shards, then draw them
            model.to_empty(device=layout.device)
            seed_rank(cfg.seed, layout.rank, step=-1)   # independent draws per shard
            model.init_weights()
        if layout.distributed:        # weights were drawn identically everywhere; from here on, per rank
            seed_rank(cfg.seed, layout.rank)
        return model

    reseed = functools.partial(seed_rank, cfg.seed, layout.rank) if layout.distributed else None
    trainer = distributed(trainer_cls)(
        cfg, layout, parallelize=parallelize_then_seed, init_device=torch.device("meta") if meta_init else None,
        checkpointer=DCPCheckpointer(os.path.join(cfg.out_dir, "checkpoints"), cfg.keep_last, reseed=reseed),
        count_targets=functools.partial(_all_sum_int, device=layout.device) if layout.distributed else None,
        is_main=layout.rank == 0,
        dp_rank=layout.rank, dp_size=layout.world, grad_scale=1.0, clip_grad_norm=clip_grad_norm_,
        print_fn=functools.partial(log0, layout=layout))
    cfg.batch = global_batch          # the schedule is planned; config.yaml and checkpoints record what was asked
    result = trainer.fit(resume=resume)
    if export:
        result["export"] = str(export_from_ranks(trainer, layout))
    return result


def _all_sum_int(n: int, device) -> int:
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def export_from_ranks(trainer, layout: Layout):
    """Gather full parameters (every rank takes part), rank 0 writes the Hugging Face directory."""
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..model import DeepseekV2
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = Path(trainer.cfg.out_dir) / "hf"
    if layout.rank == 0:
        plain = DeepseekV2(trainer.model.config)   # fresh init (incl. rope buffers), then overwritten
        plain.load_state_dict(full)
        save_pretrained(plain, path, tokenizer_dir=trainer.tokenizer_dir)
        log0(f"exported {path}", layout=layout)
    dist.barrier()
    return path
