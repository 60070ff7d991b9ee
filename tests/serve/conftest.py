"""A tiny served model: a byte-level BPE trained here and a random tiny DeepSeek-V2 saved next to it.

The server under test is real: uvicorn on a free 127.0.0.1 port in a background thread,
driven over HTTP by the official `openai` client. One server (module scope) serves most
tests; it is deliberately small (4 slots, a queue of 4) so that the burst test can fill it.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

API_KEY = "test-key"
SLOTS, MAX_QUEUE, MAX_LEN, MAX_BODY = 4, 4, 256, 64 * 1024
CORPUS = [
    "DeepSeek-V2 is a strong, economical and efficient mixture-of-experts language model.",
    "Multi-head latent attention caches a small latent vector instead of keys and values.",
    "深度求索发布了混合专家语言模型，它既强大又经济。你好，世界！",
    "Emoji travel well over UTF-8: 🙂 🚀 ✨. Numbers too: 0 1 2 3 4 5 6 7 8 9.",
    "User: hello there\n\nAssistant: hi, how can I help?",
]


def train_tokenizer(path, vocab_size: int = 384) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": specials[0], "eos_token": specials[1], "add_bos_token": True}))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A checkpoint folder named 'tiny-chat': config.json, model.safetensors, tokenizer files."""
    from dsv2 import ModelConfig, Tokenizer
    from dsv2.model import DeepseekV2
    path = tmp_path_factory.mktemp("ckpt") / "tiny-chat"
    path.mkdir()
    train_tokenizer(path)
    tok = Tokenizer(path)
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                                  eos_token_id=tok.eos_id, num_hidden_layers=2)
    torch.manual_seed(0)
    model = DeepseekV2(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.save_pretrained(path, tokenizer_dir=path)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    from dsv2.serve.launch import ServerThread, build_server
    app = build_server(model_dir, slots=SLOTS, max_len=MAX_LEN, max_queue=MAX_QUEUE, api_key=API_KEY,
                       max_body_bytes=MAX_BODY, default_max_tokens=32, compile=False)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture()
def client(server):
    import openai
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
