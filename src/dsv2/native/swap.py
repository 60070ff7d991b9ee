"""Every native module swap in one call: the engine's prepare_for_decode and the trainer (on CPU,
not compiled) take the same ones, so a policy that generates its own rollouts trains as it decodes.

    use_native(model)   # MLA -> NativeMLA, GroupedExperts -> NativeGroupedExperts, RMSNorm ->
                        # NativeRMSNorm, LocalDispatcher -> NativeDispatcher (same parameters)

Each swapped module still runs the model's own code where its operator cannot (CUDA, other dtypes).
"""

from __future__ import annotations

from torch import nn

from .attention import use_native_attention
from .experts import use_native_experts
from .layers import use_native_layers


def use_native(model: nn.Module) -> nn.Module:
    """-> model, its modules swapped in place for their native subclasses (idempotent)."""
    use_native_attention(model)
    use_native_experts(model)
    use_native_layers(model)
    return model
