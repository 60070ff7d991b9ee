"""The dense SwiGLU feed-forward network: W2 (silu(W1 x) * W3 x).

Used for the first `first_k_dense_replace` layers and for the shared experts of each
MoE layer (N_s shared experts are one SwiGLU of hidden N_s * moe_intermediate_size).
"""

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)  # W1
        self.up_proj = Linear(dim, hidden, bias=False)    # W3
        self.down_proj = Linear(hidden, dim, bias=False)  # W2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
