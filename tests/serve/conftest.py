"""A tiny served model: a byte-level BPE trained here and a random tiny DeepSeek-V2 saved next to it.

The server under test is real: uvicorn on a free 127.0.0.1 port in a background thread,
driven over HTTP by the official `openai` client. One server (module scope) serves most
tests; it is deliberately small (4 slots, a queue of 4) so that the burst test can fill it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# The serve tests share serve_helpers.py; put this folder on the path whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import API_KEY, MAX_BODY, MAX_LEN, MAX_QUEUE, SLOTS, train_tokenizer  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A checkpoint folder named 'tiny-chat': config.json, model.safetensors, tokenizer files."""
    from dsv2 import ModelConfig, Tokenizer, save_pretrained
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
    save_pretrained(model, path, tokenizer_dir=path)
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
