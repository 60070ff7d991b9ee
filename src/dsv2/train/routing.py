"""Device-limited routing rules: which expert lives in which group, and what a token touches.

Experts are spread evenly over D groups (devices): expert e is in group e // (N_r / D)
(`model.moe.expert_groups`, the one map the gate also routes by). Under expert parallelism a
group is a rank. The model's gate does the routing itself (`topk_method: group_limited_greedy`, n_group = D,
topk_group = M); this file gives the training side the same map, the groups each token
reaches, and M, so the balance losses and dropping agree with the gate.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..model.moe import expert_groups

__all__ = ["expert_groups", "groups_touched", "routing_groups"]


def groups_touched(idx_NK: torch.Tensor, group_E: torch.Tensor, n_groups: int,
                   keep_NK: torch.Tensor | None = None) -> torch.Tensor:
    """[N, D] bool: token n sends at least one (kept) copy to group d."""
    g_NK = group_E[idx_NK]
    src = torch.ones_like(g_NK) if keep_NK is None else keep_NK.long()
    counts_ND = torch.zeros(g_NK.shape[0], n_groups, dtype=torch.long, device=g_NK.device)
    return counts_ND.scatter_add_(1, g_NK, src) > 0


def routing_groups(cfg: ModelConfig, device_groups: int | None = None) -> tuple[int, int]:
    """(D, M) for the training rules: D from the training config, else the model's n_group;
    M = topk_group when routing is device-limited, else as many groups as K_r can reach."""
    D = device_groups or (cfg.n_group if cfg.topk_method == "group_limited_greedy" else None) or 1
    if cfg.topk_method == "group_limited_greedy" and D == cfg.n_group:
        M = cfg.topk_group
    else:
        M = min(cfg.num_experts_per_tok, D)
    return D, M
