"""The MoE training rules, handed to each training forward as its `moe_hooks` (model.moe.MoEHooks).

`MoERules(model, moe_cfg)` finds every MoE layer and builds the token-dropping policy. A
training forward `model(..., moe_hooks=rules)` asks it for each layer's keep mask (the layer's
dispatcher decides over which tokens the policy runs: this process's, or an expert-parallel
group's) and hands it each layer's routing. After the forward, `collect(B, T)` returns the
balance losses (summed over layers, one term per layer as in the paper) and accumulates
per-expert loads and drop counts for the metrics; `begin(ids)` tells the policy which
sequences of the coming micro-batch are protected. Forwards without it (evaluation,
generation) neither drop nor record.

Shape legend: B sequences, T tokens, N = B*T, E routed experts, K experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model.moe import MoE, MoEHooks, Routing
from .balance import balance_losses
from .config import MoEConfig
from .dropping import DropPolicy
from .routing import expert_groups, routing_groups


class MoERules(MoEHooks):
    def __init__(self, model: nn.Module, cfg: MoEConfig, seed: int = 0):
        self.cfg = cfg
        self.layers: list[MoE] = [m for m in model.modules() if isinstance(m, MoE)]
        mcfg = model.config
        self.n_experts = mcfg.n_routed_experts or 0
        self.D, self.M = routing_groups(mcfg, cfg.device_groups) if self.layers else (1, 1)
        self.group_E = expert_groups(self.n_experts, self.D) if self.layers else None
        self.policy = (DropPolicy(self.group_E, self.D, cfg.capacity_factor, cfg.protect_fraction, seed)
                       if cfg.drop_tokens and self.layers else None)
        self._routing: dict[MoE, tuple[Routing, torch.Tensor | None]] = {}
        self.reset_stats()

    # ------------------------------------------------------------ the hooks
    def keep(self, moe: MoE, route: Routing, shape: torch.Size) -> torch.Tensor | None:
        return None if self.policy is None else moe.dispatcher.drop(self.policy, route, shape)

    def record(self, moe: MoE, route: Routing, keep: torch.Tensor | None) -> None:
        # Keyed by layer: a recomputed forward (activation checkpointing) records the same again.
        self._routing[moe] = (route, keep)

    def reset_stats(self) -> None:
        self.load_LE = torch.zeros(len(self.layers), max(1, self.n_experts), dtype=torch.long)
        self.copies = 0
        self.dropped = 0

    def begin(self, sample_ids_B: torch.Tensor) -> None:
        if self.policy is not None:
            self.policy.set_batch(sample_ids_B)

    def collect(self, B: int, T: int, valid_BT: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Balance losses of the last forward, summed over MoE layers; updates load statistics.
        valid_BT marks real tokens in padded rows: padding counts in neither."""
        total: dict[str, torch.Tensor] = {}
        c = self.cfg
        for li, m in enumerate(self.layers):
            r, keep = self._routing.pop(m, (None, None))   # popped: frees the graph references
            if r is None:
                continue
            group_E = self.group_E.to(r.idx_NK.device)
            K = r.idx_NK.shape[-1]
            losses = balance_losses(r.scores_NE.view(B, T, -1), r.idx_NK.view(B, T, K), group_E, self.D, self.M,
                                    c.exp_bal, c.dev_bal, c.comm_bal, None if keep is None else keep.view(B, T, K),
                                    valid_BT)
            for k, v in losses.items():
                total[k] = total[k] + v if k in total else v
            with torch.no_grad():
                valid_NK = (torch.ones_like(r.idx_NK, dtype=torch.bool) if valid_BT is None
                            else valid_BT.reshape(-1, 1).expand_as(r.idx_NK))
                kept_NK = valid_NK if keep is None else valid_NK & keep
                self.load_LE[li] += torch.bincount(r.idx_NK[kept_NK], minlength=self.n_experts).cpu()
                self.copies += int(valid_NK.sum())
                if keep is not None:
                    self.dropped += int((valid_NK & ~keep).sum())
        return total

    def drop_rate(self) -> float:
        return self.dropped / self.copies if self.copies else 0.0
