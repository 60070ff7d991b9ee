"""Tiny DeepSeek-V2 checkpoints built by transformers itself, in the variants the model issue names.

Building them with transformers' own DeepseekV2ForCausalLM(...).save_pretrained is the
strongest check that dsv2 loads what real users have. Weights are re-drawn with a larger
std than the default so that routing, rope and scaling choices visibly change the logits.
(A module of its own, not conftest.py, so tests can import it by a unique name.)
"""

from __future__ import annotations

import torch

BASE = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=12, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1,
            max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
# The variants the model issue asks parity for.
VARIANTS = {
    "v2": {},                                                   # query compression (DeepSeek-V2 style)
    "lite": dict(q_lora_rank=None),                             # no query compression (V2-Lite style)
    "yarn": dict(rope_scaling=YARN),
    "grouped": dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "scaled": dict(routed_scaling_factor=2.5, n_shared_experts=2),
    "norm_topk": dict(norm_topk_prob=True),
}


def make_hf_model(seed: int = 0, **overrides):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**(BASE | overrides))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model
