"""The model's linear layer: nn.Linear that computes in its input's dtype.

Weights are cast to the activations' dtype where the two differ, so whoever calls the model
chooses the arithmetic once by the dtype it feeds in. The engine prefills a bfloat16 model in
float32 on CPUs without bfloat16 arithmetic (where torch's bfloat16 GEMM is emulated and runs
several times slower), with the weights widened matrix by matrix as they are used: the same
sums a bfloat16 GEMM accumulates in float32. Same parameters, same checkpoint keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return F.linear(x, w, b)
