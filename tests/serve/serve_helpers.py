"""Shared pieces of the serve tests: the test server's limits, a tiny tokenizer, raw HTTP.

A module of its own (not conftest.py) so tests can import it by a name no other test folder uses.
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

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
    from dsv2.data.bpe import BOS, EOS, byte_level_bpe
    specials = [BOS, EOS]
    tok = byte_level_bpe(CORPUS * 20, vocab_size, special_tokens=specials)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": specials[0], "eos_token": specials[1], "add_bos_token": True}))


def post(url: str, path: str, body, key: str | None = API_KEY, method: str = "POST"):
    """Raw HTTP (the openai client would refuse to send most of these) -> (status, parsed JSON)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    conn.request(method, path, body=data if method == "POST" else None, headers=headers)
    r = conn.getresponse()
    status, payload = r.status, r.read()
    conn.close()
    return status, json.loads(payload)
