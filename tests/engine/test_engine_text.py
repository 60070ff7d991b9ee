"""Streaming text never splits a UTF-8 character (Chinese, emoji); stop strings are held back, then cut."""

from __future__ import annotations

import torch

import dsv2
from dsv2.engine.text import TextStream

import _tiny

TEXT = "Hello 你好，世界！🙂🚀 DeepSeek 深度求索 👍🏽 end"


def tokenizer():
    return dsv2.Tokenizer(_tiny.checkpoint())


def test_stream_chunks_are_whole_characters():
    tok = tokenizer()
    ids = tok.encode(TEXT, add_bos=False)
    assert tok.decode(ids) == TEXT
    # The byte-level BPE really does split characters: some single tokens are partial UTF-8.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stream = TextStream(tok)
    chunks = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(chunks) == TEXT
    assert all("\ufffd" not in c for c in chunks)
    assert sum(bool(c) for c in chunks) > 5  # it streams, not one chunk at the end


def test_stop_string_is_held_back_then_cut():
    tok = tokenizer()
    ids = tok.encode(TEXT, add_bos=False)
    stream = TextStream(tok, stop=["🚀 Deep", "zzz"])
    out = ""
    for i in ids:
        out += stream.push(i)
        assert "🚀" not in out  # the stop string's start is never handed out early
        if stream.stopped:
            break
    out += stream.finish()
    assert stream.stopped and out == "Hello 你好，世界！🙂"


class ScriptedModel(torch.nn.Module):
    """Stands in for DeepseekV2: the token after position p is script[p - start], so the engine
    must stream exactly `script` (here Chinese and emoji) through its real prefill/decode loop."""

    def __init__(self, config, script, start):
        super().__init__()
        self.config, self.script, self.start = config, script, start
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, kv=None, step=None, absorb=False, last_only=False, dtype=None):
        last = step.positions[:, -1] - self.start + 1
        logits = torch.full((x.shape[0], 1, self.config.vocab_size), -1e9)
        for b, i in enumerate(last.tolist()):
            logits[b, 0, self.script[min(i, len(self.script) - 1)]] = 0.0
        return logits


def test_llm_stream_through_the_engine_keeps_characters_whole():
    real = dsv2.LLM(_tiny.checkpoint())
    prompt = real.tokenizer.encode("say:")
    script = real.tokenizer.encode(TEXT, add_bos=False) + [real.tokenizer.eos_id]
    llm = dsv2.LLM(_tiny.checkpoint())
    llm.model = ScriptedModel(real.model.config, script, len(prompt))
    chunks = list(llm.stream(prompt, max_new_tokens=100))
    assert "".join(chunks) == TEXT and all("\ufffd" not in c for c in chunks) and len(chunks) > 5
    [full] = llm.generate([prompt], max_new_tokens=100)
    assert full.text == TEXT and full.finish_reason == "stop" and full.token_ids == script
