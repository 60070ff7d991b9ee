"""GRPO, the objective (DeepSeekMath §4.1, DeepSeek-V2 §4.2): group-relative advantages, no value network.

For a question q, G outputs o_1..o_G are sampled from the old policy and rewarded r_1..r_G.
Outcome supervision gives every token of o_i the advantage

    A_i = (r_i - mean(r)) / std(r)                                  (std over the group, Bessel)

and the policy maximises, per token t of o_i, with rho = pi(o_it) / pi_old(o_it),

    l_it = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta KL_k3(pi || pi_ref)
    KL_k3 = exp(ref - logp) - (ref - logp) - 1                         (unbiased, always >= 0)

averaged over each output's tokens and then over outputs (the paper's 1/|o_i|, agg="grpo").
Two other normalisers fix its length bias: agg="token" divides the batch's summed token
terms by its number of tokens (DAPO), agg="constant" by outputs x a fixed length (Dr. GRPO).
Process supervision instead rewards steps: each step reward is normalised over the group's
steps and a token's advantage is the sum of the normalised rewards of the steps that end at
or after it (`process_advantages`).

Shapes: B outputs (N questions x G, group after group), T completion tokens.
"""

from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")
AGGS = ("grpo", "token", "constant")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [N*G] (group after group) -> advantages [N*G].

    scale="group": (r - group mean) / (group std + eps); "batch": the group mean, the batch's
    std; "none": mean-centring only. A group whose rewards are all equal gets 0."""
    if scale not in SCALES:
        raise ValueError(f"advantage scale {scale!r}: use one of {', '.join(SCALES)}.")
    r = rewards.float()
    if r.dim() != 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}: the batch must hold "
                         f"whole groups (prompts x group_size outputs).")
    r_NG = r.view(-1, group_size)
    centred = r_NG - r_NG.mean(1, keepdim=True)
    if scale == "none":
        return centred.flatten()
    if group_size < 2:
        return torch.zeros_like(r)
    std = r_NG.std(1, keepdim=True) if scale == "group" else r.std().expand(r_NG.shape[0], 1)
    return (centred / (std + eps)).flatten()


def process_advantages(step_rewards: list[list[float]], step_ends: list[list[int]], group_size: int,
                       length: int, eps: float = 1e-4) -> torch.Tensor:
    """Process supervision: output i has step rewards step_rewards[i] for steps ending at token
    indices step_ends[i]. Rewards are normalised over all steps of the group; a token's
    advantage is the sum of the normalised rewards of the steps ending at or after it. -> [B, length]"""
    B = len(step_rewards)
    if B % group_size:
        raise ValueError(f"{B} outputs do not split into groups of {group_size}.")
    out = torch.zeros(B, length)
    for g in range(0, B, group_size):
        flat = torch.tensor([x for i in range(g, g + group_size) for x in step_rewards[i]], dtype=torch.float32)
        mean, std = (flat.mean(), flat.std()) if flat.numel() > 1 else (flat.mean() if flat.numel() else 0.0, 0.0)
        for i in range(g, g + group_size):
            for reward, end in zip(step_rewards[i], step_ends[i]):
                out[i, : min(end, length - 1) + 1] += (reward - mean) / (std + eps)
    return out


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi: exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, eps_low: float = 0.2, eps_high: float | None = None, beta: float = 0.04,
              agg: str = "grpo", max_len: int | None = None, return_stats: bool = False):
    """The scalar to minimise (with return_stats: and its diagnostics kl, clip_ratio, ratio_mean).

    logp, old_logp, ref_logp: [B, T] log-probs of the sampled tokens (ref_logp may be None when
    beta = 0); advantages: [B] (outcome) or [B, T] (process); mask: [B, T], 1 on completion
    tokens (EOS included), 0 on padding."""
    if agg not in AGGS:
        raise ValueError(f"agg={agg!r}: use grpo (per-output mean), token (per-token mean) or constant.")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs the reference model's log-probs (ref_logp).")
    m = mask.to(logp.dtype)
    A = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    hi = 1 + (eps_low if eps_high is None else eps_high)
    surrogate = torch.minimum(ratio * A, ratio.clamp(1 - eps_low, hi) * A)
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)
    per_token = surrogate - beta * kl
    if agg == "grpo":
        objective = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif agg == "token":
        objective = (per_token * m).sum() / m.sum().clamp(min=1)
    else:
        objective = (per_token * m).sum() / (logp.shape[0] * (max_len or logp.shape[1]))
    if not return_stats:
        return -objective
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clipped = clip_active(ratio, A, eps_low, eps_high)
        stats = {"kl": float((kl * m).sum() / n), "clip_ratio": float((clipped.to(m.dtype) * m).sum() / n),
                 "ratio_mean": float((ratio * m).sum() / n)}
    return -objective, stats


def clip_active(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float = 0.2,
                eps_high: float | None = None) -> torch.Tensor:
    """Where the clipped term is the smaller one and has no gradient: (rho > 1+eps, A > 0) or (rho < 1-eps, A < 0)."""
    A = advantages[:, None] if advantages.dim() == 1 and ratio.dim() == 2 else advantages
    return ((ratio > 1 + (eps_low if eps_high is None else eps_high)) & (A > 0)) | ((ratio < 1 - eps_low) & (A < 0))
