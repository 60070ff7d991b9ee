"""AdamW as the paper trains: beta 0.9 / 0.95, weight decay 0.1 on matrices only.

Matrices (embeddings, projections, stacked experts [E, ...], the gate's centroids) are
decayed; RMSNorm scales and biases (1-D) are not, since shrinking them toward 0 fights
the normalisation rather than regularising. The fused kernel (one pass over all
parameters) is used where this torch build has it for the device.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (its two halves, so the same numbers bit for bit), less its
    multiply by 1 when nothing needs clipping on CPU, where reading the norm costs no device sync:
    that multiply is a pass over every gradient, ~11 ms of `small`'s 1.0 s step. -> the total norm."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if all(p.grad.device.type == "cpu" for p in params) and bool(max_norm / (total + 1e-6) >= 1.0):
        return total   # torch would scale by its clamp of this ratio: exactly 1.0
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
