"""Gradient clipping when gradients live on different meshes.

After parallelize(), dense gradients are DTensors on the flattened "dp_all" mesh and
expert gradients are DTensors on the 2-D (dp, ep) mesh; torch's clip_grad_norm_ refuses to
mix meshes. The norm is taken per mesh (a DTensor reduction gives the global value), the
per-mesh norms are combined, and torch's own clip_grads_with_norm_ scales every gradient.
With plain tensors this is exactly torch.nn.utils.clip_grad_norm_.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip gradients to `max_norm` in total; returns the total norm before clipping (a plain tensor)."""
    params = [p for p in parameters if p.grad is not None]
    by_mesh = defaultdict(list)
    for p in params:
        by_mesh[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    norms = []
    for group in by_mesh.values():
        n = get_total_norm([p.grad for p in group], norm_type)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    total = get_total_norm(norms, norm_type) if norms else torch.zeros(())
    if max_norm is not None and max_norm > 0:
        for group in by_mesh.values():   # one mesh per call: foreach ops cannot mix meshes
            clip_grads_with_norm_(group, max_norm, total)
    return total
