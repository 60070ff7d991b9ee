"""Quantized latent caches (fp8, int8, the ~6-bit mixed format): their bytes, their rounding, and
decoding that reads the stored rows."""

from __future__ import annotations

import pytest
import torch

import dsv2
from dsv2 import ModelConfig
from dsv2.engine import Engine, Request, SamplingParams
from dsv2.engine.cache import FORMATS, LatentCache, bytes_per_token, kv_format

import _tiny


def test_bytes_per_token_of_every_format_for_deepseek_v2():
    """60 layers x (512 + 64): bf16 1152 bytes a layer, fp8 576, int8 576 + its float32 scale, mixed
    256 (4-bit c^KV) + 32 (16 bf16 group scales) + 128 (bf16 k^R)."""
    cfg = ModelConfig.from_preset("deepseek-v2")
    assert bytes_per_token(cfg) == 69_120
    assert bytes_per_token(cfg, "fp8") == 34_560
    assert bytes_per_token(cfg, "int8") == 60 * 580
    assert bytes_per_token(cfg, "mixed") == 60 * 416
    bits = kv_format("mixed", cfg).bits_per_element()
    assert bits == pytest.approx(5.78, abs=0.005) and bits <= 6
    small = LatentCache(_tiny.random_model().config, 2, 8, torch.float32, kv_cache_dtype="int8")
    assert small.joint[0].dtype == torch.uint8 and small.bytes_per_token() == 2 * (64 + 16 + 4)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_rows_round_trip_within_each_formats_step(name):
    C, R = 64, 16
    fmt = FORMATS[name](C, R)
    x = torch.randn(5, 7, C + R) * torch.logspace(-2, 1, 7)[:, None]
    rows = fmt.encode(x, torch.tensor(1.0))
    assert rows.dtype == torch.uint8 and rows.shape == (5, 7, fmt.row_bytes())
    back = fmt.decode(rows, torch.tensor(1.0))
    err = (back - x).abs()
    if name == "fp8":
        assert (err <= x.abs() / 16 + 2**-10).all()
    elif name == "int8":
        assert (err <= x.abs().amax(-1, keepdim=True) / 254 * 1.001).all()
    else:   # c^KV: half a step of its group's amax / 7 (scale rounded to bf16); k^R: bf16
        amax = x[..., :C].unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True)
        assert (err[..., :C].unflatten(-1, (-1, 32)) <= amax / 14 * 1.01).all()
        assert torch.equal(back[..., C:], x[..., C:].bfloat16().float())


def decode_once(model, fmt, native, prompts, steps=3):
    """Prefill `prompts` (batched), decode `steps` tokens each; -> (logprobs per step, the cache)."""
    eng = Engine(model, max_batch_slots=len(prompts), max_len=48, native=native, kv_cache_dtype=fmt)
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True, logprobs=3)
    eng.add_many([Request(p, params, id=i) for i, p in enumerate(prompts)])
    out = []
    while eng.seqs:
        out += [(o.request_id, o.token_id, o.top_logprobs) for o in eng.step()]
    return out, eng.cache


@pytest.mark.parametrize("name", ["fp8", "int8", "mixed", "bfloat16"])
def test_fused_decode_reads_the_stored_rows(name):
    """The fused step over a packed cache equals PyTorch-ops decoding, which widens the stored rows
    explicitly: same tokens, logprobs within float tolerance; the rows the C step wrote decode to
    the rows PyTorch wrote (equal but for a rare rounding tie one code apart)."""
    m = _tiny.random_model(num_hidden_layers=3)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
    a, ca = decode_once(m, name, True, prompts)
    b, cb = decode_once(m, name, False, prompts)
    assert [(i, t) for i, t, _ in a] == [(i, t) for i, t, _ in b]
    for (_, _, x), (_, _, y) in zip(a, b):
        assert max(abs(p - q) for (_, p), (_, q) in zip(x, y)) < 1e-3
    C = m.config.kv_lora_rank
    for layer in range(3):
        wa, wb = ca.widened(layer), cb.widened(layer)
        step = wb[..., :C].abs().amax() / (7 if name == "mixed" else 127)
        assert ((wa - wb).abs() <= step).all()
        assert ((wa - wb).abs() > 1e-6).float().mean() < 0.01


def test_chunked_and_batched_prefill_write_the_same_packed_rows():
    m = _tiny.random_model()
    prompt = list(range(3, 40))
    caches = []
    for chunk, batched in ((2048, False), (8, False), (2048, True)):
        eng = Engine(m, max_batch_slots=2, max_len=64, prefill_chunk=chunk, kv_cache_dtype="mixed", native=False)
        reqs = [Request(prompt, SamplingParams(max_new_tokens=1)), Request(prompt[:20], SamplingParams(max_new_tokens=1))]
        eng.add_many(reqs) if batched else eng.add(reqs[0])
        caches.append(eng.cache.widened(1)[0, : len(prompt)])
    assert torch.allclose(caches[0], caches[1], atol=1e-5) and torch.allclose(caches[0], caches[2], atol=1e-5)


def test_greedy_generation_with_fp8_and_int8_caches_stays_with_the_float_cache(hf_checkpoint):
    """On a transformers-written checkpoint, 8-bit caches move greedy decoding little: measured on
    this random model (chaotic by design, weights at std 0.15), int8 keeps 94% of first tokens and
    91% of 8-token continuations, fp8 (3 mantissa bits) 88% and 47%; the bounds leave a margin."""
    llm = {f: dsv2.LLM(hf_checkpoint("v2"), dtype="float32", kv_cache_dtype=f) for f in ("auto", "fp8", "int8")}
    prompts = [[i, i + 3, i + 7, (5 * i) % 150 + 2] for i in range(2, 34)]
    ref = llm["auto"].generate(prompts, max_new_tokens=8, ignore_eos=True, logprobs=0)
    for f, want_first, want_same, want_lp in (("int8", 0.85, 0.75, 0.03), ("fp8", 0.75, 0.35, 0.1)):
        got = llm[f].generate(prompts, max_new_tokens=8, ignore_eos=True, logprobs=0)
        first = sum(g.token_ids[0] == r.token_ids[0] for g, r in zip(got, ref)) / len(ref)
        same = sum(g.token_ids == r.token_ids for g, r in zip(got, ref)) / len(ref)
        lp = sum(abs(g.logprobs[0] - r.logprobs[0]) for g, r in zip(got, ref)) / len(ref)
        assert first >= want_first and same >= want_same and lp < want_lp, (f, first, same, lp)


def test_unknown_kv_cache_dtype_is_refused_by_name():
    m = _tiny.random_model()
    for make in (lambda: Engine(m, kv_cache_dtype="fp4"), lambda: dsv2.LLM(m, kv_cache_dtype="int4")):
        with pytest.raises(ValueError, match="unknown kv_cache_dtype '(fp4|int4)': use one of auto, bfloat16, "):
            make()
    odd = _tiny.random_model(kv_lora_rank=48)
    with pytest.raises(ValueError, match="groups of 32, but kv_lora_rank is 48"):
        Engine(odd, kv_cache_dtype="mixed")


def test_info_prints_the_bytes_of_each_format_and_the_papers_comparison(capsys):
    from dsv2.cli import main
    for fmt, nbytes in (("fp8", "34,560"), ("int8", "34,800"), ("mixed", "24,960"), ("bfloat16", "69,120")):
        assert main(["info", "--preset", "deepseek-v2", "--kv-cache-dtype", fmt]) == 0
        assert f"KV cache per token: {nbytes} bytes in {fmt} (34560 elements" in capsys.readouterr().out
    assert main(["info", "--preset", "deepseek-v2", "--compare-mha"]) == 0
    out = capsys.readouterr().out
    assert "194,560" in out and "389,120" in out          # DeepSeek 67B: 2 x 8 x 128 x 95 elements, bf16 bytes
    assert "bfloat16 17.8% (-82.2%)" in out and "mixed 6.4% (-93.6%)" in out   # the paper: -93.3% at 6 bits


def test_fused_step_widens_every_e4m3_code_as_torch_does():
    """Cache rows holding every e4m3 code (subnormals, both zeros, the largest) under a layer scale:
    the fused step's logits equal PyTorch's, which widens the codes with torch's own conversion."""
    m = _tiny.random_model()
    codes = torch.tensor([c for c in range(256) if c & 0x7f != 0x7f], dtype=torch.uint8)
    out = {}
    for native in (True, False):
        eng = Engine(m, max_batch_slots=1, max_len=40, native=native, kv_cache_dtype="fp8")
        eng.cache.scales.fill_(0.125)
        for j in eng.cache.joint:
            j[0, :32] = codes[torch.arange(32 * j.shape[-1]) % len(codes)].view(32, -1)
        eng.cache.lengths[0] = 32
        eng.cached_ids[0] = list(range(3, 35))
        eng.add(Request(list(range(3, 36)), SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=5)))
        outs = []
        while eng.seqs:
            outs += [o.top_logprobs for o in eng.step()]
        out[native] = outs
    for a, b in zip(out[True][1:], out[False][1:]):
        assert [t for t, _ in a] == [t for t, _ in b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-3
