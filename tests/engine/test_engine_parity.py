"""Greedy generation matches transformers token for token; decode (absorbed) matches a full naive forward."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import dsv2
from dsv2.engine import Engine, Request, SamplingParams

LENGTHS = (5, 17, 9, 30)
NEW = 16


def prompts(vocab=160, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("variant", ["v2", "lite", "yarn", "grouped"])
def test_greedy_batch_matches_transformers_generate(hf_checkpoint, variant):
    from transformers import DeepseekV2ForCausalLM
    path = hf_checkpoint(variant)
    ps = prompts()
    ours = dsv2.LLM(path).generate(ps, max_new_tokens=NEW)
    # transformers: one left-padded batch with an attention mask, greedy, stopping at EOS (id 1).
    hf = DeepseekV2ForCausalLM.from_pretrained(path).eval()
    L = max(LENGTHS)
    ids = torch.tensor([[0] * (L - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    for r, row in zip(ours, out[:, L:].tolist()):
        want = row[: row.index(1) + 1] if 1 in row else row
        assert r.token_ids == want
        assert r.finish_reason == ("stop" if want[-1] == 1 else "length")
    assert len({tuple(r.token_ids) for r in ours}) == len(ours)  # prompts lead to different outputs


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")), reason="no C compiler"))],
    ids=["torch", "fused"])
def test_every_decode_step_matches_full_naive_forward(hf_checkpoint, native):
    """Slots of different lengths decode together; each step's absorbed-path logits (PyTorch ops, or
    the fused C step) equal a cache-free naive forward over the whole sequence so far (float32, 1e-4)."""
    model = dsv2.load_pretrained(hf_checkpoint("yarn"))
    eng = Engine(model, max_batch_slots=3, max_len=64, compile=False, native=native)
    assert (eng._decode.native is not None) == native
    seen = []
    inner = eng._decode
    eng._decode = lambda *a: seen.append(inner(*a)) or seen[-1]
    seqs = {}
    for p in prompts()[:3]:
        slot = eng.add(Request(p, SamplingParams(max_new_tokens=8, ignore_eos=True)))
        seqs[slot] = list(p)
    for step in range(8):
        outs = eng.step()
        if step > 0:  # step 0 only hands out the prefill tokens
            logits = seen[-1]
            for o in outs:
                ref = model(torch.tensor([seqs[o.slot]]))[0, -1]
                assert (logits[o.slot] - ref).abs().max().item() < 1e-4
        for o in outs:
            seqs[o.slot].append(o.token_id)
    assert len(seen) == 7
