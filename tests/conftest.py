"""Shared fixtures. The tiny transformers-built checkpoints come from hf_models.py; a DeepSeek-V2-style
tokenizer, a tiny checkpoint to fine-tune and chat files for the SFT tests (align/, distributed/)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from align_helpers import SFT_CHATS, SFT_CORPUS
from hf_models import VARIANTS, make_hf_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """hf_checkpoint(variant) -> directory written by transformers' save_pretrained (cached per session)."""
    cache = {}

    def build(variant: str = "v2", **overrides):
        key = (variant, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"hf_{variant}")
            make_hf_model(**(VARIANTS[variant] | overrides)).save_pretrained(path)
            cache[key] = path
        return cache[key]

    return build


@pytest.fixture(scope="session")
def ds_tok_dir(tmp_path_factory):
    from dsv2.data.bpe import BOS, EOS, byte_level_bpe
    d = tmp_path_factory.mktemp("ds_tok")
    byte_level_bpe(SFT_CORPUS * 30, 400, special_tokens=[BOS, EOS]).save(str(d / "tokenizer.json"))
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

@pytest.fixture(scope="session")
def chat_files(tmp_path_factory):
    """train.jsonl (32 chats, both shapes, multi-turn, Chinese and emoji) and val.jsonl."""
    d = tmp_path_factory.mktemp("chats")
    rows = [{"messages": SFT_CHATS[i % 3]} for i in range(24)] + [{"prompt": f"{i} + 1 =", "completion": str(i + 1)}
                                                                  for i in range(8)]
    (d / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (d / "val.jsonl").write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in SFT_CHATS))
    return d
