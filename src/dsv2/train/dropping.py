"""Device-level token dropping (training only), as DeepSeek-V2 trains.

Each device group gets a capacity of `capacity_factor` x its average load, where the load is
the routed token copies of this micro-batch (N tokens x K_r copies / D groups). Copies over a
group's capacity are dropped lowest affinity s_{i,t} first: their routed contribution is
zero, while the residual path and the shared experts still apply. Copies from protected
sequences (about `protect_fraction` of them, chosen by a hash of each sequence's sample id
so the choice is reproducible and needs no RNG state) are never dropped; they are placed
first and may push a group over capacity. The model applies the policy only in training.

Shape legend: N tokens, K experts per token, D groups, B sequences.
"""

from __future__ import annotations

import math

import torch


def capacity_keep(affinity_NK: torch.Tensor, group_NK: torch.Tensor, n_groups: int, capacity: int,
                  protected_NK: torch.Tensor | None = None) -> torch.Tensor:
    """keep_NK: per group, the `capacity` highest-affinity copies (protected ones always kept)."""
    prio = affinity_NK.detach().float().flatten()
    prot = None if protected_NK is None else protected_NK.flatten()
    if prot is not None:
        prio = prio + 2.0 * prot  # affinities are in [0, 1]: protected copies rank above all others
    by_prio = prio.argsort(descending=True, stable=True)
    g = group_NK.flatten()
    order = by_prio[g[by_prio].argsort(stable=True)]          # grouped, each group by priority
    g_sorted = g[order]
    start_D = torch.bincount(g_sorted, minlength=n_groups).cumsum(0) - torch.bincount(g_sorted, minlength=n_groups)
    rank = torch.arange(order.numel(), device=order.device) - start_D[g_sorted]
    keep_sorted = rank < capacity
    if prot is not None:
        keep_sorted |= prot[order]
    keep = torch.empty_like(keep_sorted)
    keep[order] = keep_sorted
    return keep.view_as(affinity_NK)


def protected_sequences(sample_ids_B: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """[B] bool: a reproducible ~`fraction` of sequences, by a multiplicative hash of their ids."""
    h = (sample_ids_B * 2654435761 + seed * 40503) % 1_000_003
    return h < int(fraction * 1_000_003)


class DropPolicy:
    """The token-dropping policy MoERules hands to each layer's dispatcher: (Routing, x shape [B, T, D]) -> keep_NK."""

    def __init__(self, group_E: torch.Tensor, n_groups: int, capacity_factor: float = 1.0,
                 protect_fraction: float = 0.1, seed: int = 0):
        self.group_E, self.n_groups = group_E, n_groups
        self.capacity_factor, self.protect_fraction, self.seed = capacity_factor, protect_fraction, seed
        self.protect_B: torch.Tensor | None = None   # set per micro-batch by the trainer

    def set_batch(self, sample_ids_B: torch.Tensor) -> None:
        self.protect_B = protected_sequences(sample_ids_B, self.protect_fraction, self.seed)

    def capacity(self, n_copies: int) -> int:
        return math.ceil(self.capacity_factor * n_copies / self.n_groups)

    def __call__(self, routing, x_shape) -> torch.Tensor:
        B, T = x_shape[0], x_shape[1]
        idx_NK = routing.idx_NK
        N, K = idx_NK.shape
        group_E = self.group_E.to(idx_NK.device)
        protected_NK = None
        if self.protect_B is not None and self.protect_B.numel() == B:
            protected_NK = self.protect_B.to(idx_NK.device)[:, None, None].expand(B, T, K).reshape(N, K)
        affinity_NK = routing.scores_NE.gather(1, idx_NK)
        return capacity_keep(affinity_NK, group_E[idx_NK], self.n_groups, self.capacity(N * K), protected_NK)
