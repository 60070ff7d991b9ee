"""A DeepSeek-V2-style tokenizer (its BOS/EOS strings, no chat template: the default applies)
and a tiny checkpoint to fine-tune, built here (no download)."""

from __future__ import annotations

import json

import pytest
import torch

CORPUS = [
    "User: What is 3 plus 4?\n\nAssistant: 7",
    "Upper-case this: red fox runs. RED FOX RUNS.",
    "深度求索发布了混合专家语言模型，它既强大又经济。你好，世界！谢谢。",
    "Emoji travel well over UTF-8: 🙂 🚀 ✨. Numbers too: 0 1 2 3 4 5 6 7 8 9.",
    "You are a helpful assistant. Answer briefly.",
]


@pytest.fixture(scope="session")
def ds_tok_dir(tmp_path_factory):
    from dsv2.data.bpe import BOS, EOS, byte_level_bpe
    d = tmp_path_factory.mktemp("ds_tok")
    byte_level_bpe(CORPUS * 30, 400, special_tokens=[BOS, EOS]).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "add_bos_token": True}))
    return d


@pytest.fixture(scope="session")
def sft_base(tmp_path_factory, ds_tok_dir):
    """A tiny MoE checkpoint (2 layers, the second MoE) with the tokenizer beside it."""
    from dsv2 import ModelConfig, Tokenizer, save_pretrained
    from dsv2.model import DeepseekV2
    tok = Tokenizer(ds_tok_dir)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                  num_hidden_layers=2, hidden_size=64, q_lora_rank=32, kv_lora_rank=32,
                                  intermediate_size=128, moe_intermediate_size=32, num_attention_heads=2,
                                  max_position_embeddings=512)
    torch.manual_seed(0)
    model = DeepseekV2(cfg)
    path = tmp_path_factory.mktemp("sft_base")
    save_pretrained(model, path, tokenizer_dir=ds_tok_dir)
    return path
