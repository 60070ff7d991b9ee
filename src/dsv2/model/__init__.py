"""The DeepSeek-V2 model, one concept per file in forward order:
norm -> rope -> attention (MLA) -> ffn (dense SwiGLU) -> moe (DeepSeekMoE) -> transformer."""

from .attention import MLA, KVStep
from .moe import MoE, Routing
from .transformer import DeepseekV2

__all__ = ["DeepseekV2", "MLA", "KVStep", "MoE", "Routing"]
