"""parallelize(): every distributed transformation of the model, in one place and one order.

    1. expert parallel          routed experts -> DTensors over "ep", all_to_all dispatcher
    2. activation checkpointing each Block recomputes its forward in the backward pass
    3. compile                  each Block compiled in place (parameter names unchanged)
    4. FSDP2 (fully_shard)      experts over "dp", each Block and the root over "dp_all"

The order matters: FSDP2 must see the experts' DTensors (it then shards them a second
time, over what remains of the data-parallel ranks), and checkpointing/compile wrap the
Block's forward inside the FSDP hooks, as torchtitan does. No wrapper modules are
inserted, so parameter names (and checkpoint keys) are the same as the plain model's.

Gradients are SUMMED over ranks (FSDP's divide factor is set to 1): each rank's loss is its
own share of the global loss (the trainer divides by the global target-token count), so
the summed gradient is exactly the one-process gradient of the same global batch.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from ..model.moe import MoE
from .expert_parallel import apply_expert_parallel
from .mesh import Layout


def parallelize(model: nn.Module, layout: Layout, *, activation_checkpointing: bool = False,
                compile: bool = False, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True) -> nn.Module:
    """Apply EP, AC, compile and FSDP2 to `model` in place and return it.

    param_dtype=torch.bfloat16 gives FSDP2 mixed precision (bf16 compute and all-gathers,
    fp32 master weights and fp32 gradient reduction). With a one-process layout only
    activation checkpointing and compile apply.
    """
    blocks = list(model.layers)
    if layout.distributed and layout.ep > 1:
        _check_ep(model, layout)
        apply_expert_parallel(model, layout.mesh["ep"])
    if activation_checkpointing:
        for block in blocks:
            _checkpoint_forward(block)
    if compile:
        for block in blocks:
            block.compile()
    if layout.distributed:
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        shard = functools.partial(fully_shard, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        for block in blocks:
            if layout.ep > 1 and isinstance(block.mlp, MoE):
                shard(block.mlp.experts, mesh=layout.mesh["dp"])
            shard(block, mesh=layout.dp_all_mesh)
        shard(model, mesh=layout.dp_all_mesh, reshard_after_forward=False)  # the root is needed first in backward
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)   # plain SUM: gloo has no PREMUL_SUM
                # A rank whose tokens skip some experts has no gradient for them; reduce zeros
                # so every rank's reduce-scatter has the same size.
                m.set_reduce_scatter_unused_params(True, recurse=False)
    return model


def _checkpoint_forward(block: nn.Module) -> None:
    """Recompute this block's activations in backward, without a wrapper module (names stay)."""
    inner = block.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    block.forward = forward


def _check_ep(model: nn.Module, layout: Layout) -> None:
    cfg = model.config
    if cfg.n_routed_experts % layout.ep:
        raise ValueError(f"--ep {layout.ep} must divide n_routed_experts ({cfg.n_routed_experts}).")
    if cfg.topk_method == "group_limited_greedy" and cfg.n_group != layout.ep:
        from .mesh import log0
        log0(f"note: n_group (D = {cfg.n_group}) differs from the EP size ({layout.ep}): device-limited routing "
             f"then bounds expert groups, not ranks. Set n_group = EP for M to bound each token's fan-out.",
             layout=layout)
