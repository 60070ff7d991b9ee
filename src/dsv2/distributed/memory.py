"""What a parallel layout costs in memory per rank, estimated from the config before anything is built.

Per rank, with W = DP x EP ranks, fp32 master weights and AdamW:

    sharded state      (dense + routed) parameters / W  x (4 param + 4 grad + 8 AdamW) bytes
    gathered block     one Block's dense parameters, plus its experts / EP, in compute dtype,
                       x2 because FSDP2 prefetches the next block while computing this one
    activations        with checkpointing: one [tokens, d] input per layer + one block's
                       internals; without: every layer's internals (roughly 16 d + K d per token)

Expert parallelism does not change the sharded state (everything is sharded W ways
either way); it shrinks the gathered block (experts are gathered over DP only) and
replaces expert all-gathers with token all-to-alls. These are estimates (no allocator
overhead, no logits beyond one [tokens, vocab] fp32 buffer), printed at start so a
layout that cannot fit is caught before the first step.
"""

from __future__ import annotations

from ..config import ModelConfig


def _block_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(dense, routed-expert) parameter counts of one block."""
    d, h = cfg.hidden_size, cfg.num_attention_heads
    q = (d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim) if cfg.q_lora_rank \
        else d * h * cfg.qk_head_dim
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank \
        + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn = q + kv + h * cfg.v_head_dim * d + 2 * d
    if not moe:
        return attn + 3 * d * cfg.intermediate_size, 0
    shared = 3 * d * cfg.moe_intermediate_size * (cfg.n_shared_experts or 0)
    routed = 3 * d * cfg.moe_intermediate_size * cfg.n_routed_experts
    return attn + shared + d * cfg.n_routed_experts, routed


def estimate(cfg: ModelConfig, dp: int, ep: int, tokens_per_rank: int, compute_bytes: int = 2,
             checkpointing: bool = False) -> dict[str, float]:
    """Bytes per rank: {"state", "gathered", "activations", "total"}."""
    W = dp * ep
    blocks = [_block_params(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers)]
    dense = sum(b[0] for b in blocks) + 2 * cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    routed = sum(b[1] for b in blocks)
    state = (dense + routed) / W * 16
    biggest = max(b[0] + b[1] / ep for b in blocks)
    gathered = 2 * biggest * compute_bytes
    d, K = cfg.hidden_size, cfg.num_experts_per_tok or 0
    per_layer = tokens_per_rank * (16 * d + K * d) * compute_bytes
    acts = (tokens_per_rank * d * compute_bytes * cfg.num_hidden_layers + per_layer) if checkpointing \
        else per_layer * cfg.num_hidden_layers
    acts += tokens_per_rank * cfg.vocab_size * 4
    return {"state": state, "gathered": gathered, "activations": acts, "total": state + gathered + acts}


def describe(cfg: ModelConfig, dp: int, ep: int, tokens_per_rank: int, compute_bytes: int = 2,
             checkpointing: bool = False) -> str:
    e = estimate(cfg, dp, ep, tokens_per_rank, compute_bytes, checkpointing)
    gb = {k: v / 2**30 for k, v in e.items()}
    return (f"memory per rank (estimate, DP {dp} x EP {ep}, {tokens_per_rank} tokens per micro-batch"
            f"{', checkpointing' if checkpointing else ''}): {gb['total']:.2f} GiB = sharded params+grads+AdamW "
            f"{gb['state']:.2f} + gathered blocks {gb['gathered']:.2f} + activations {gb['activations']:.2f}")
