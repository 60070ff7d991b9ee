"""Sampling: seeds, top-k/top-p, stops, lengths; early finishers leave the batch cleanly."""

from __future__ import annotations

import pytest
import torch

import dsv2
from dsv2.engine import Engine, Request, SamplingParams
from dsv2.engine.sampling import sample

import _tiny


def llm():
    return dsv2.LLM(_tiny.checkpoint())


def test_sampler_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(3, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    params = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=5.0)]
    seen = [set() for _ in range(3)]
    for _ in range(300):
        for i, t in enumerate(sample(logits.clone(), params, gens).tolist()):
            seen[i].add(t)
    assert seen[0] == {0, 1}          # top-2
    assert seen[1] == {0}             # p(0) = 0.64 >= 0.5: the nucleus is one token
    assert len(seen[2]) == 6          # hot temperature reaches the whole vocabulary


def test_seed_reproducible_and_independent_of_batch():
    m = llm()
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=7, ignore_eos=True)
    a = m.generate(["深度求索", "The quick"], **kw)
    b = m.generate(["The quick"], **kw)
    c = m.generate(["The quick"], **dict(kw, seed=8))
    assert a[1].token_ids == b[0].token_ids
    assert b[0].token_ids != c[0].token_ids
    greedy = m.generate(["The quick"], max_new_tokens=12, ignore_eos=True)[0]
    assert m.generate(["The quick"], max_new_tokens=12, temperature=1.0, top_k=1, seed=3,
                      ignore_eos=True)[0].token_ids == greedy.token_ids


def test_stop_token_ids_stop_strings_and_length():
    m = llm()
    ref = m.generate(["Hello"], max_new_tokens=10, ignore_eos=True)[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 10
    stop_id = ref.token_ids[4]
    r = m.generate(["Hello"], max_new_tokens=10, stop=[stop_id], ignore_eos=True)[0]
    k = ref.token_ids.index(stop_id)
    assert r.finish_reason == "stop" and r.token_ids == ref.token_ids[: k + 1]
    text = ref.text
    ref = m.generate(["Hello world"], max_new_tokens=20, ignore_eos=True)[0]
    text = ref.text
    cut = next(i for i in range(2, len(text)) if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2])
    stop = text[cut:cut + 2]  # a stop string starting mid-text
    r = m.generate(["Hello world"], max_new_tokens=20, stop=stop, ignore_eos=True)[0]
    assert r.finish_reason == "stop" and r.text == text[: text.find(stop)] and stop not in r.text
    assert len(r.token_ids) < 20


def test_early_finisher_leaves_the_batch_and_others_continue():
    m = llm()
    full = m.generate(["Hello", "深度求索", "quick"], max_new_tokens=9, ignore_eos=True)
    eng = Engine(m.model, m.tokenizer, max_batch_slots=3, max_len=64, compile=False)
    lens = (2, 9, 5)
    for i, (p, n) in enumerate(zip(["Hello", "深度求索", "quick"], lens)):
        eng.add(Request(m.encode(p), SamplingParams(max_new_tokens=n, ignore_eos=True), id=i))
    got = {i: [] for i in range(3)}
    while eng.seqs:
        for o in eng.step():
            got[o.request_id].append(o.token_id)
            assert o.finished == (len(got[o.request_id]) == lens[o.request_id])
    assert [got[i] for i in range(3)] == [f.token_ids[:n] for f, n in zip(full, lens)]
    assert eng.step() == []


def test_more_prompts_than_slots_are_queued_in_order():
    m = llm()
    prompts = ["Hello", "深度求索", "quick", "Emoji 🙂", "fox"]
    want = m.generate(prompts, max_new_tokens=5, ignore_eos=True)
    m.max_batch_slots = 2
    got = m.generate(prompts, max_new_tokens=5, ignore_eos=True)
    assert m.last_engine.slots == 2
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_sampler_keeps_its_tensors_on_the_logits_device():
    """GPU models: temperature, top-k/top-p masks and the seeded draws must live on the logits'
    device. The meta device stands in for a GPU here (mixing it with CPU tensors raises too)."""
    ps = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1), SamplingParams(temperature=0.7, top_k=3, seed=2),
          SamplingParams()]
    out = sample(torch.zeros(3, 50, device="meta"), ps, [p.generator() for p in ps])
    assert out.device.type == "meta" and out.shape == (3,)


def test_logprobs_are_the_models_log_softmax():
    """Each generated token's logprob (and its top alternatives) equals the log-softmax of a full
    forward over prompt + tokens so far, for greedy and sampled rows in one batch."""
    m = llm()
    prompts = ["深度求索", "The quick brown"]
    greedy, sampled = (m.generate([p], max_new_tokens=6, ignore_eos=True, logprobs=3, **kw)[0]
                       for p, kw in zip(prompts, ({}, dict(temperature=1.5, seed=1))))
    batch = m.generate(prompts, max_new_tokens=6, ignore_eos=True, logprobs=3, temperature=1.5, seed=1)
    assert batch[1].token_ids == sampled.token_ids
    for prompt, r in ((prompts[0], greedy), (prompts[1], sampled), (prompts[1], batch[1])):
        ids = m.encode(prompt) + r.token_ids
        with torch.no_grad():
            ref = m.model(torch.tensor([ids]))[0].log_softmax(-1)[len(ids) - len(r.token_ids) - 1: -1]
        want = ref.gather(1, torch.tensor(r.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r.logprobs), want, atol=1e-4)
        for row, top in zip(ref, r.top_logprobs):
            vals, idx = row.topk(3)
            assert [t for t, _ in top] == idx.tolist()
            assert torch.allclose(torch.tensor([v for _, v in top]), vals, atol=1e-4)
    # greedy picks the most likely token, so its logprob is the top alternative's
    assert all(abs(lp - top[0][1]) < 1e-6 for lp, top in zip(greedy.logprobs, greedy.top_logprobs))
    assert m.generate(prompts, max_new_tokens=2)[0].logprobs is None
    # Prompt logprobs: position t scores prompt token t + 1; the same whether or not a cached
    # prefix could have been reused, and in prefill chunks of any size.
    ids = m.encode(prompts[1]) + greedy.token_ids[:3]
    with torch.no_grad():
        ref = m.model(torch.tensor([ids]))[0].log_softmax(-1)
    want = [None] + ref[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    for chunk in (2048, 3):
        eng = Engine(m.model, max_batch_slots=1, max_len=64, compile=False, prefill_chunk=chunk)
        for _ in range(2):  # the second time the slot holds the whole prompt already
            eng.add(Request(ids, SamplingParams(max_new_tokens=1, prompt_logprobs=2)))
            [out] = eng.step()
            got = out.prompt_logprobs
            assert len(got) == len(ids) and got[0] == (None, [])
            assert all(abs(g[0] - w) < 1e-4 for g, w in zip(got[1:], want[1:]))
            assert all(len(g[1]) == 2 and g[1][0][1] >= g[0] - 1e-6 for g in got[1:])
    [r] = m.generate([ids], max_new_tokens=1, prompt_logprobs=0)
    assert [lp for lp, _ in r.prompt_logprobs[1:]] == pytest.approx(want[1:], abs=1e-4)
    with pytest.raises(ValueError, match="logprobs"):
        m.generate(prompts, max_new_tokens=2, logprobs=21)
