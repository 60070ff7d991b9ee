"""A checkpoint written by transformers' DeepseekV2ForCausalLM.save_pretrained, with a byte-level
BPE tokenizer that both dsv2 and transformers' AutoTokenizer load (session-cached)."""

from __future__ import annotations

import json
import os

import pytest

# lm-eval loads local JSONL through `datasets`: never try the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "Question: What is 12 plus 30?\nAnswer: 42\n\n",
    "深度求索发布了新的混合专家语言模型。你好，世界！",
    "class Stack:\n    def push(self, x):\n        self.items.append(x)\n",
]


def write_tokenizer(path, vocab_size: int = 200, add_bos: bool = True) -> int:
    from dsv2.data.bpe import byte_level_bpe
    tk = byte_level_bpe(TEXTS * 30, vocab_size, special_tokens=["<bos>", "<eos>"])
    tk.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": add_bos,
         "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512}))
    return tk.get_vocab_size()


@pytest.fixture(scope="session")
def hf_eval_checkpoint(tmp_path_factory):
    """-> directory: transformers-written weights (max_position_embeddings 512) + tokenizer files."""
    from hf_models import make_hf_model
    path = tmp_path_factory.mktemp("hf_eval")
    vocab = write_tokenizer(path)
    make_hf_model(vocab_size=vocab, bos_token_id=0, eos_token_id=1).save_pretrained(path)
    return path
