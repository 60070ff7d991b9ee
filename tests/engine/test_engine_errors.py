"""Bad input gets one clear sentence, before any work starts."""

from __future__ import annotations

import pytest
import torch

import dsv2
from dsv2.engine import Engine, EngineFull, Request, SamplingParams

import _tiny


@pytest.fixture(scope="module")
def llm():
    return dsv2.LLM(_tiny.checkpoint())


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[""]), "prompt is empty"),
    (dict(prompts=[[]]), "prompt is empty"),
    (dict(prompts=["x" * 400]), "context holds"),
    (dict(prompts=["hi"], stop=[1.5]), "stop entries must be strings or token ids"),
    (dict(prompts=["hi"], stop=[{"a": 1}]), "stop entries must be strings or token ids"),
    (dict(prompts=["hi"], temperature=-0.1), "temperature must be >= 0"),
    (dict(prompts=["hi"], top_p=0.0), "top_p must be in (0, 1]"),
    (dict(prompts=["hi"], top_k=0), "top_k must be a positive integer"),
    (dict(prompts=["hi"], max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(prompts=[[5, 10_000]]), "prompt token ids must be ints"),
    (dict(prompts="hi"), "list of prompts"),
])
def test_generate_rejects_bad_input(llm, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        llm.generate(**kwargs)


def test_bad_batch_fails_before_any_work(llm):
    with pytest.raises(ValueError, match="context holds"):
        llm.generate(["fine", "x" * 400])
    assert llm.last_engine.seqs == {}


def test_text_without_tokenizer_and_full_engine():
    model = dsv2.load_pretrained(_tiny.checkpoint())
    bare = dsv2.LLM(model)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        bare.generate(["hello"])
    assert bare.generate([[3, 4, 5]], max_new_tokens=3, ignore_eos=True)[0].token_ids  # ids work
    eng = Engine(model, max_batch_slots=1, max_len=16, compile=False)
    eng.add(Request([3, 4], SamplingParams(max_new_tokens=2)))
    with pytest.raises(EngineFull):
        eng.add(Request([3, 4], SamplingParams()))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        Engine(model, max_batch_slots=1, max_len=16, compile=False).add(Request([3], SamplingParams(stop=["x"])))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        Engine(model, max_len=10_000)
    with pytest.raises(ValueError, match="checkpoint directory or a DeepseekV2"):
        dsv2.LLM(torch.nn.Linear(2, 2))


def test_cancel_frees_the_slot(llm):
    eng = Engine(llm.model, llm.tokenizer, max_batch_slots=2, max_len=64, compile=False)
    eng.add(Request([3, 4, 5], SamplingParams(max_new_tokens=50, ignore_eos=True), id="a"))
    eng.add(Request([6, 7], SamplingParams(max_new_tokens=50, ignore_eos=True), id="b"))
    eng.step()
    assert eng.cancel("a") and not eng.cancel("zz")
    assert {o.request_id for o in eng.step()} == {"b"}
    assert eng.has_free_slot()


def test_compile_failure_falls_back_to_eager_with_a_notice(monkeypatch, capsys):
    import dsv2.engine.decode as decode

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(decode.torch, "compile", broken)
    model = dsv2.load_pretrained(_tiny.checkpoint())
    eng = Engine(model, max_batch_slots=1, max_len=16, compile=True)
    assert not eng._decode.compiled
    assert "decoding eagerly" in capsys.readouterr().err
    eng.add(Request([3, 4], SamplingParams(max_new_tokens=3, ignore_eos=True)))
    assert sum(len(eng.step()) for _ in range(3)) == 3
