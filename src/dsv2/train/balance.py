"""The three auxiliary balance losses of DeepSeek-V2 (paper §2.2.3), per sequence.

For one sequence of T tokens, with s_{i,t} the softmax affinity of token t for expert i,
N_r routed experts, K_r chosen per token, D groups (devices), M groups per token:

    L_ExpBal  = a1 sum_i f_i P_i       f_i = N_r/(K_r T) sum_t 1(t selects i),  P_i = 1/T sum_t s_{i,t}
    L_DevBal  = a2 sum_d f'_d P'_d     f'_d = mean_{i in E_d} f_i,             P'_d = sum_{i in E_d} P_i
    L_CommBal = a3 sum_d f''_d P''_d   f''_d = D/(M T) sum_t 1(t sent to d),   P''_d = sum_{i in E_d} P_i

f counts are constants (no gradient); the gradient reaches the gate through P. Each loss
equals its coefficient under perfect balance. With token dropping, f and f' count what the
router selected, and f'' what is actually sent: a group counts for a token only if at least
one of the token's copies to it was kept. Each function returns the mean over the
B sequences; inputs are one MoE layer's routing for a micro-batch reshaped per sequence.
Rows padded at the end (packed SFT rows) pass valid_BT: T is then each row's count of
real tokens, and padding is neither counted in f nor averaged into P.

Shape legend: B sequences, T tokens per sequence, E routed experts, K experts per token,
D expert groups.
"""

from __future__ import annotations

import torch


def _weights(idx_BTK: torch.Tensor, valid_BT: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token weights [B, T] (1 real, 0 padding) and each row's token count T_b [B, 1]."""
    B, T, _ = idx_BTK.shape
    w = torch.ones(B, T, device=idx_BTK.device) if valid_BT is None else valid_BT.float()
    return w, w.sum(1, keepdim=True).clamp(min=1)


def expert_fraction(idx_BTK: torch.Tensor, n_experts: int, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """f_BE = N_r/(K_r T) x (number of tokens of each sequence choosing each expert)."""
    B, T, K = idx_BTK.shape
    w_BT, T_B1 = _weights(idx_BTK, valid_BT)
    counts = torch.zeros(B, n_experts, device=idx_BTK.device).scatter_add_(
        1, idx_BTK.reshape(B, T * K), w_BT[:, :, None].expand(B, T, K).reshape(B, T * K))
    return counts * n_experts / (K * T_B1)


def mean_affinity(scores_BTE: torch.Tensor, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    """P_BE = 1/T sum_t s_{i,t}, over each row's real tokens."""
    if valid_BT is None:
        return scores_BTE.float().mean(dim=1)
    w = valid_BT.float()[:, :, None]
    return (scores_BTE.float() * w).sum(1) / w.sum(1).clamp(min=1)


def group_sum(x_BE: torch.Tensor, group_E: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum over the experts of each group: [B, E] -> [B, D]."""
    return x_BE.new_zeros(x_BE.shape[0], n_groups).index_add_(1, group_E, x_BE)


def expert_balance(scores_BTE: torch.Tensor, idx_BTK: torch.Tensor, coef: float,
                   valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    f_BE = expert_fraction(idx_BTK, scores_BTE.shape[-1], valid_BT)
    P_BE = mean_affinity(scores_BTE, valid_BT)
    return coef * (f_BE * P_BE).sum(-1).mean()


def device_balance(scores_BTE: torch.Tensor, idx_BTK: torch.Tensor, group_E: torch.Tensor, n_groups: int,
                   coef: float, valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    E = scores_BTE.shape[-1]
    f_BD = group_sum(expert_fraction(idx_BTK, E, valid_BT), group_E, n_groups) / (E / n_groups)  # mean over E_d
    P_BD = group_sum(mean_affinity(scores_BTE, valid_BT), group_E, n_groups)
    return coef * (f_BD * P_BD).sum(-1).mean()


def comm_balance(scores_BTE: torch.Tensor, idx_BTK: torch.Tensor, group_E: torch.Tensor, n_groups: int,
                 max_groups: int, coef: float, keep_BTK: torch.Tensor | None = None,
                 valid_BT: torch.Tensor | None = None) -> torch.Tensor:
    B, T, K = idx_BTK.shape
    g_BTK = group_E[idx_BTK]
    w_BT, T_B1 = _weights(idx_BTK, valid_BT)
    sent_BTK = w_BT[:, :, None].expand(B, T, K) * (1.0 if keep_BTK is None else keep_BTK.float())
    sent_BTD = torch.zeros(B, T, n_groups, device=idx_BTK.device).scatter_reduce_(2, g_BTK, sent_BTK, "amax")
    f_BD = sent_BTD.sum(1) * n_groups / (max_groups * T_B1)
    P_BD = group_sum(mean_affinity(scores_BTE, valid_BT), group_E, n_groups)
    return coef * (f_BD * P_BD).sum(-1).mean()


def balance_losses(scores_BTE: torch.Tensor, idx_BTK: torch.Tensor, group_E: torch.Tensor, n_groups: int,
                   max_groups: int, a1: float, a2: float, a3: float,
                   keep_BTK: torch.Tensor | None = None, valid_BT: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The enabled losses (coefficient > 0) for one layer: {"exp_bal", "dev_bal", "comm_bal"};
    keep_BTK (token dropping) marks the copies that were sent, valid_BT the tokens that are not padding."""
    out = {}
    if a1:
        out["exp_bal"] = expert_balance(scores_BTE, idx_BTK, a1, valid_BT)
    if a2:
        out["dev_bal"] = device_balance(scores_BTE, idx_BTK, group_E, n_groups, a2, valid_BT)
    if a3:
        out["comm_bal"] = comm_balance(scores_BTE, idx_BTK, group_E, n_groups, max_groups, a3, keep_BTK, valid_BT)
    return out
