"""The latent cache: per engine, (d_c + d_h^R) x layers x dtype bytes per token, slots independent."""

from __future__ import annotations

import pytest
import torch

import dsv2
from dsv2.engine import Engine, Request, SamplingParams

import _tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_bytes_per_token(dtype):
    cfg = dsv2.ModelConfig.from_preset("tiny")
    model = dsv2.DeepseekV2(cfg).to(dtype).eval()
    eng = Engine(model, max_batch_slots=3, max_len=40, compile=False)
    size = torch.empty((), dtype=dtype).element_size()
    want = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * size
    assert eng.cache.bytes_per_token() == want == model.kv_cache_bytes_per_token(dtype)
    assert eng.cache.nbytes == want * 3 * 40
    held = sum(t.numel() * t.element_size() for t in eng.cache.joint)
    assert held == eng.cache.nbytes  # nothing else is cached: no per-head keys or values
    assert all(t.dtype == dtype for t in eng.cache.joint)


def test_cache_lives_in_the_engine_not_the_model():
    cfg = dsv2.ModelConfig.from_preset("tiny")
    model = dsv2.DeepseekV2(cfg).eval()
    before = {k: v.shape for k, v in model.state_dict().items()}
    buffers = sum(b.numel() for b in model.buffers())
    a = Engine(model, max_batch_slots=2, max_len=32, compile=False)
    b = Engine(model, max_batch_slots=1, max_len=16, compile=False)
    assert a.cache.c_kv[0].shape == (2, 32, cfg.kv_lora_rank) and b.cache.k_pe[0].shape == (1, 16, cfg.qk_rope_head_dim)
    assert {k: v.shape for k, v in model.state_dict().items()} == before
    assert sum(b.numel() for b in model.buffers()) == buffers


def test_slots_do_not_disturb_each_other():
    """A request decoded next to others (added mid-flight, different lengths) gives the same greedy
    tokens as alone: per-slot positions and masks, no padding leaks."""
    model = _tiny.random_model()
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    ps = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (7, 3, 20)]

    def alone(p):
        eng = Engine(model, max_batch_slots=1, max_len=64, compile=False)
        eng.add(Request(p, params))
        out = []
        while eng.seqs:
            out += [o.token_id for o in eng.step()]
        return out

    eng = Engine(model, max_batch_slots=3, max_len=64, compile=False)
    got = {i: [] for i in range(3)}
    eng.add(Request(ps[0], params, id=0))
    for step in range(30):
        if step == 2:
            eng.add(Request(ps[1], params, id=1))
        if step == 5:
            eng.add(Request(ps[2], params, id=2))
        for o in eng.step():
            got[o.request_id].append(o.token_id)
    assert [got[i] for i in range(3)] == [alone(p) for p in ps]


def test_moe_inference_paths_equal_reference():
    """The MoE shortcuts the engine relies on (one token; padded experts for a few tokens) agree with
    the reference loop, and training-mode calls still take the dispatcher."""
    from dsv2.model.moe import MoE
    cfg = dsv2.ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    moe = MoE(cfg).eval()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        for n in (1, 3, 16):
            x = torch.randn(1, n, cfg.hidden_size)
            ref = moe.reference_forward(x)
            assert (moe(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
    x = torch.randn(1, 3, cfg.hidden_size, requires_grad=True)
    moe(x).sum().backward()
    assert moe.experts.gate_up_proj.grad is not None


def test_chunked_prefill_equals_one_pass():
    """A prompt prefilled in chunks (each attending to the cache so far) writes the same latents
    and gives the same first logits and greedy tokens as one pass."""
    cfg = dsv2.ModelConfig.from_preset("tiny", vocab_size=256, hidden_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    model = dsv2.DeepseekV2(cfg).eval()
    prompt = torch.randint(2, 256, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    runs = {}
    for chunk in (2048, 5, 1):
        eng = Engine(model, max_batch_slots=1, max_len=64, compile=False, prefill_chunk=chunk)
        logits, _ = eng._prefill(0, prompt, 0)
        joint = eng.cache.joint[0][0, :len(prompt)]
        latents = [joint[:, :cfg.kv_lora_rank].clone(), joint[:, cfg.kv_lora_rank:].clone()]
        eng.cached_ids[0] = []
        eng.add(Request(prompt, params))
        tokens = []
        while eng.seqs:
            tokens += [o.token_id for o in eng.step()]
        runs[chunk] = logits, latents, tokens
    whole = runs[2048]
    for chunk in (5, 1):
        logits, latents, tokens = runs[chunk]
        assert (logits - whole[0]).abs().max() <= 1e-4 * whole[0].abs().max()
        assert all((a - b).abs().max() <= 1e-5 for a, b in zip(latents, whole[1]))
        assert tokens == whole[2]
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, max_batch_slots=1, max_len=64, compile=False, prefill_chunk=0)


def test_a_failed_prefill_leaves_no_stale_prefix():
    """A prefill that fails part way (after writing some latents over a reused prefix) must not
    let a later request reuse those latents as if they were the old prompt's."""
    cfg = dsv2.ModelConfig.from_preset("tiny", vocab_size=256, hidden_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    model = dsv2.DeepseekV2(cfg).eval()
    first = list(range(10, 30))
    params = SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=0)

    def first_token(eng, prompt):
        eng.add(Request(prompt, params))
        [out] = eng.step()
        return out.token_id, out.logprob

    want = first_token(Engine(model, max_batch_slots=1, max_len=64, compile=False), first)
    eng = Engine(model, max_batch_slots=1, max_len=64, compile=False, prefill_chunk=4)
    first_token(eng, first)
    calls = {"n": 0}
    forward = model.forward

    def failing(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second chunk: the first one has overwritten positions 5..8
            raise RuntimeError("out of memory")
        return forward(*a, **kw)

    model.forward = failing
    try:
        with pytest.raises(RuntimeError):
            eng.add(Request(first[:5] + [99] * 10, params))
    finally:
        del model.forward
    assert eng.cached_ids[0] == first[:5]
    got = first_token(eng, first)
    assert got[0] == want[0] and abs(got[1] - want[1]) < 1e-4


def test_add_many_prefills_fresh_prompts_together_with_the_same_results():
    """Prompts of different lengths added at once (one padded forward per run of adjacent free
    slots; a prompt reusing a cached prefix on its own) give the same tokens and logprobs as
    added one by one."""
    model = _tiny.random_model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 256, (n,), generator=g).tolist() for n in (7, 3, 12, 5)]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=1)

    def run(batched: bool):
        eng = Engine(model, max_batch_slots=6, max_len=64, compile=False)
        eng.add(Request(prompts[0] + [1, 2], params, id="busy"))   # holds slot 0
        eng.add(Request(prompts[2][:6], params, id="prefix"))     # slot 1 ...
        eng.add(Request([9, 9], params, id="gone"))               # slot 2 ...
        eng._add_at(3, 0, Request(prompts[2][:6], params, id="x"))
        for s in (1, 2, 3):
            eng.free(s)                # free: 1 and 3 keep prompt 2's first 6 tokens for reuse
        reqs = [Request(p, params, id=i) for i, p in enumerate(prompts)]
        slots = eng.add_many(reqs) if batched else [eng.add(r) for r in reqs]
        out = {}
        while eng.seqs:
            for o in eng.step():
                out.setdefault(o.request_id, []).append((o.token_id, round(o.logprob, 4)))
        return slots, out

    slots, batched = run(True)
    # Lowest free slot first (prompt 0 takes slot 1), prompt 2 the slot still holding its
    # prefix (3): fresh prompts 0, 1, 3 are prefilled as runs [1, 2] and [4], prompt 2 alone.
    assert slots == [1, 2, 3, 4]
    _, single = run(False)
    assert batched.keys() == single.keys()
    for k in batched:
        assert [t for t, _ in batched[k]] == [t for t, _ in single[k]]
        assert all(abs(a - b) < 1e-3 for (_, a), (_, b) in zip(batched[k], single[k]))
