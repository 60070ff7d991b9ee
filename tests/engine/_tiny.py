"""A tiny DeepSeek-V2 checkpoint with a byte-level BPE tokenizer trained here, for engine tests.

Built once per test session (cached) in a temporary directory: tokenizer.json and
tokenizer_config.json next to the weights, as a freshly pretrained checkpoint has them.
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import torch

CORPUS = [
    "DeepSeek-V2 is a strong, economical and efficient mixture-of-experts language model.",
    "Multi-head latent attention caches a compressed latent instead of keys and values.",
    "深度求索发布了新的混合专家语言模型。你好，世界！今天天气很好。",
    "我们喜欢用中文和英文写作。模型的上下文长度是一百二十八千。",
    "Emoji time: 🙂 🚀 👍🏽 🎉 and more 🙂🙂 text.",
    "The quick brown fox jumps over the lazy dog. 1234567890",
]


@functools.lru_cache(maxsize=None)
def checkpoint(vocab_size: int = 384) -> Path:
    import dsv2
    from dsv2.data.bpe import byte_level_bpe
    out = Path(tempfile.mkdtemp(prefix="dsv2_engine_tiny_"))
    tk = byte_level_bpe(CORPUS * 20, vocab_size, special_tokens=["<bos>", "<eos>"])
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}))
    cfg = dsv2.ModelConfig.from_preset("tiny", vocab_size=tk.get_vocab_size(), hidden_size=64,
                                       num_hidden_layers=3, intermediate_size=128, moe_intermediate_size=32,
                                       q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                                       qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    model = dsv2.DeepseekV2(cfg).eval()
    with torch.no_grad():  # larger weights than the init so greedy outputs vary with the prompt
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    dsv2.save_pretrained(model, out)
    return out


def random_model(**overrides):
    """A tiny in-memory DeepSeek-V2 (vocab 256, hidden 64, 2 layers unless overridden) with weights
    drawn at std 0.1, large enough that outputs depend on the input: for engine-level checks."""
    import dsv2
    cfg = dsv2.ModelConfig.from_preset("tiny", **{"vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 2,
                                                  **overrides})
    torch.manual_seed(0)
    model = dsv2.DeepseekV2(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model
