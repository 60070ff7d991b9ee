"""Tokenizer loading, the vocabulary check, and chat rendering."""

from __future__ import annotations

import json

import pytest

from dsv2.data.bpe import byte_level_bpe
from dsv2.tokenizer import DEEPSEEK_CHAT_TEMPLATE, Tokenizer, TokenizerError, load_tokenizer


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tk = byte_level_bpe(["def hello(world):\n    return world * 2\n", "你好，世界 🙂"] * 20, 300,
                        special_tokens=["<bos>", "<eos>"])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    return d


def test_encode_decode_round_trip_with_bos(tok_dir):
    tok = Tokenizer(tok_dir)
    ids = tok.encode("你好 🙂 def")
    assert ids[0] == tok.bos_id == 0 and tok.eos_id == 1
    assert tok.decode(ids) == "你好 🙂 def"


def test_vocabulary_must_fit_the_model(tok_dir):
    n = Tokenizer(tok_dir).vocab_size
    load_tokenizer(tok_dir, model_vocab=n)
    with pytest.raises(TokenizerError, match=f"tokenizer has {n} tokens but the model's vocab_size is 256"):
        load_tokenizer(tok_dir, model_vocab=256)


def test_missing_tokenizer_is_explained(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer(tmp_path)


def test_default_chat_format_is_deepseek_v2(tok_dir):
    tok = Tokenizer(tok_dir)
    assert tok.chat_template is None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                                    {"role": "user", "content": "2+2?"}])
    assert text == "<bos>User: Hi\n\nAssistant: Hello<eos>User: 2+2?\n\nAssistant:"


def test_tokenizer_config_template_wins(tok_dir, tmp_path):
    for f in tok_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "[user]x"
    assert DEEPSEEK_CHAT_TEMPLATE  # the fallback stays defined
