"""Distributed training on PyTorch's own engine: DeviceMesh, FSDP2, DTensor, all_to_all, DCP.

Files, in the order a run uses them:
    cli.py              `dsv2 pretrain` flags (--nproc, --ep, --ac, --fsdp-bf16), no torch import
    launch.py           torchrun entry / `--nproc N` relaunch; wires the Trainer's seams
    mesh.py             Layout and the (dp, ep) DeviceMesh; backend nccl (GPU) or gloo (CPU); rank-0 logging
    memory.py           per-rank memory estimate of a layout, printed at start
    parallelize.py      EP -> activation checkpointing -> compile -> FSDP2, in one place and that order
    expert_parallel.py  experts as DTensors over "ep", the all_to_all dispatcher, EP-wide drop domains
    grad_norm.py        gradient clipping over gradients on different meshes
    checkpoint.py       DCPCheckpointer: sharded, resumable, reshardable; HF export from any layout

The model package contains no distributed code; everything here is applied from outside
(a dispatcher swap, DTensor parameters, FSDP2 hooks). See docs/distributed.md.
"""
