"""dsv2: DeepSeek-V2 (Multi-head Latent Attention + DeepSeekMoE) in plain PyTorch."""

from .checkpoint import load_pretrained, save_pretrained
from .config import ModelConfig, ConfigError
from .model import DeepseekV2
from .tokenizer import Tokenizer, load_tokenizer
from .engine import LLM

__all__ = ["load_pretrained", "save_pretrained", "ModelConfig", "ConfigError", "DeepseekV2",
           "Tokenizer", "load_tokenizer"]
__version__ = "0.1.0"
