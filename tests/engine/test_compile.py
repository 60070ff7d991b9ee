"""The inference modules the engine swaps in (engine/optimize.py) and the compiled decode step:
the same numbers as the model's own paths, one graph with no breaks, and `dsv2 generate --compile`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv2.engine import Engine, Request, SamplingParams
from dsv2.engine.optimize import DecodeMoE, RowsHead, prepare_for_decode, prefill_dtype
from dsv2.native.swap import use_native
from dsv2.quant import fp8, int8

import _tiny


def tiny(dtype=torch.float32, layers=2, **kw):
    return _tiny.random_model(num_hidden_layers=layers, moe_intermediate_size=32, intermediate_size=96,
                              n_routed_experts=8, num_experts_per_tok=2, **kw).to(dtype)


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8", "fp8"])
@pytest.mark.parametrize("n_tokens", [1, 3, 64])
def test_decode_moe_equals_the_reference_loop(fmt, n_tokens):
    """Every weight format, a token count that leaves experts without rows (1, 3) and one that
    reaches them all (64): the device-side routing and the one-operator experts give the
    model's reference loop over experts."""
    m = tiny(torch.bfloat16 if fmt == "bfloat16" else torch.float32)
    if fmt == "int8":
        int8.quantize_int8(m)
    elif fmt == "fp8":
        fp8.quantize_fp8(m, block=(16, 16))
    moe = m.layers[1].mlp
    prepare_for_decode(m)
    assert isinstance(m.layers[1].mlp, DecodeMoE) and m.layers[1].mlp.experts is moe.experts
    x = torch.randn(1, n_tokens, 64, generator=torch.Generator().manual_seed(n_tokens)).to(moe.gate.weight.dtype)
    with torch.no_grad():
        got, want = m.layers[1].mlp(x), moe.reference_forward(x)
    # int8 rows round each input row to int16 (or, without dsv2's operator, to bfloat16 up to
    # INT8_MAX_ROWS rows and widen the weights past that): the loop over all tokens and the
    # sorted rows may round differently.
    tol = {"bfloat16": 2e-2, "int8": 1e-2}.get(fmt, 1e-5)
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def test_prepare_keeps_parameters_keys_and_training():
    """Same state-dict keys and tensors, tied weights still tied, idempotent; under autograd the
    swapped MoE and head run the model's own forward, so losses and gradients are unchanged (the
    attention's and the layers' native operators are differentiable, and the trainer takes them too:
    the reference has them; test_native_attention.py and test_native_layers.py hold them to the
    model's gradients)."""
    m = tiny(tie_word_embeddings=True)
    ref = use_native(tiny(tie_word_embeddings=True))
    keys = {k: v for k, v in m.state_dict().items()}
    prepare_for_decode(prepare_for_decode(m))
    assert isinstance(m.lm_head, RowsHead) and m.lm_head.weight is m.embed_tokens.weight
    assert all(v is keys[k] or torch.equal(v, keys[k]) for k, v in m.state_dict().items())
    assert list(m.state_dict()) == list(keys)
    x = torch.randint(2, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    for model in (m, ref):
        model.train()
        model(x[:, :-1], targets=x[:, 1:]).backward()
    for (n, a), b in zip(m.named_parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad), n


def test_rows_head_equals_the_linear_layer():
    m = tiny()
    h = torch.randn(1, 16, 64)
    with torch.no_grad():
        want = F.linear(h, m.lm_head.weight)
        prepare_for_decode(m)
        got = m.lm_head(h)
    assert isinstance(m.lm_head, RowsHead) and torch.allclose(got, want, atol=1e-5)


def test_bfloat16_prefill_on_a_slow_cpu_multiplies_in_float32(monkeypatch):
    """Where the CPU emulates bfloat16 GEMMs, the engine prefills a bfloat16 model with float32
    activations (every weight widened as it is used) and decodes in bfloat16. The float32
    forward of bf16 weights is closer to the float32 model than a bfloat16 forward is."""
    import dsv2.engine.optimize as opt
    m = tiny(torch.bfloat16)
    ref = tiny()
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    monkeypatch.setattr(opt, "cpu_has_fast_bf16", lambda: False)
    assert prefill_dtype(m) is torch.float32 and prefill_dtype(ref) is None
    monkeypatch.setattr(opt, "cpu_has_fast_bf16", lambda: True)
    assert prefill_dtype(m) is None
    monkeypatch.setattr(opt, "cpu_has_fast_bf16", lambda: False)
    x = torch.randint(2, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, plain, wide = ref(x), m(x), m(x, dtype=torch.float32)
    err_wide, err_plain = (wide - want).abs().mean().item(), (plain - want).abs().mean().item()
    assert err_wide < 0.25 * err_plain, (err_wide, err_plain)
    # In the engine: float32 matmuls in the prefill, bfloat16 ones in the decode steps (but the
    # router's, which always scores in float32).
    seen = []
    linear = F.linear

    def spy(a, w, b=None):
        if w.shape[0] != 8:   # the router: n_routed_experts rows
            seen.append((a.shape[-2], a.dtype))
        return linear(a, w, b)
    monkeypatch.setattr(F, "linear", spy)
    eng = Engine(m, max_batch_slots=1, max_len=64, native=False)
    eng.add(Request(list(range(2, 30)), SamplingParams(max_new_tokens=3)))
    n_prefill = len(seen)
    while eng.step():
        pass
    # (the head takes the last position alone, in the weights' dtype: one row)
    assert n_prefill > 1 and all(dt == torch.float32 for rows, dt in seen[:n_prefill - 1])
    assert seen[n_prefill - 1] == (1, torch.bfloat16)
    assert len(seen) > n_prefill and all(dt == torch.bfloat16 for _, dt in seen[n_prefill:])


def _decode_args(eng, B):
    tokens = torch.arange(5, 5 + B)[:, None]
    pos = torch.tensor([[3 + i % 3] for i in range(B)])
    return tokens, pos, 6, eng.cache.layers(slice(0, B)), True


@pytest.mark.parametrize("dtype,kv,quantize", [
    (torch.float32, None, None), (torch.bfloat16, None, None), (torch.float32, "int8", None),
    (torch.float32, "mixed", None), (torch.float32, None, "int8"), (torch.float32, None, "fp8"),
])
def test_decode_step_is_one_graph_without_breaks(dtype, kv, quantize):
    m = tiny(dtype, layers=3, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    if quantize == "int8":
        int8.quantize_int8(m)
    elif quantize == "fp8":
        fp8.quantize_fp8(m, block=(16, 16))
    eng = Engine(m, max_batch_slots=4, max_len=32, native=False, kv_cache_dtype=kv)
    with torch.inference_mode():
        ex = torch._dynamo.explain(eng._decode._eager)(*_decode_args(eng, 4))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [r.reason for r in ex.break_reasons]


def test_compiled_decode_generates_what_eager_decoding_does():
    """torch.compile(fullgraph=True) of the decode step on CPU: the same greedy tokens as eager
    decoding, across batch sizes and lengths (dynamic shapes), with a compiled step in use."""
    model = tiny(layers=2)
    prompts = [[3, 17, 42, 9], [7, 7, 1, 250, 31, 2], [100]]

    def run(compile):
        eng = Engine(model, max_batch_slots=3, max_len=48, native=False, compile=compile)
        eng.add_many([Request(p, SamplingParams(max_new_tokens=12, ignore_eos=True), id=i)
                      for i, p in enumerate(prompts)])
        got = {i: [] for i in range(3)}
        while outs := eng.step():
            for o in outs:
                got[o.request_id].append(o.token_id)
        return got, eng

    want, _ = run(False)
    got, eng = run(True)
    assert got == want and eng._decode.compiled


def test_generate_compile_on_cpu(capsys):
    from dsv2.cli import main
    args = ["generate", str(_tiny.checkpoint()), "Multi-head latent", "--max-new-tokens", "6", "--no-native"]
    main(args)
    plain = capsys.readouterr().out
    main(args + ["--compile"])
    compiled = capsys.readouterr()
    assert compiled.out == plain and "decoding eagerly" not in compiled.err


def test_routed_experts_fall_back_to_the_loop_where_grouped_gemm_fails(monkeypatch):
    """A torch whose grouped GEMM raises for these weights (e.g. a GPU without its kernels): the
    operator runs expert by expert from then on, with the same numbers. (On CPU the native
    experts operator comes first: switched off here, as where it is not built.)"""
    import dsv2.engine.optimize as opt
    monkeypatch.setattr(opt.native_experts, "can_run", lambda *a: False)
    m = prepare_for_decode(tiny())
    x = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = m.layers[1].mlp(x)

        def broken(*a, **k):
            raise RuntimeError("no grouped GEMM here")
        monkeypatch.setattr(torch, "_grouped_mm", broken)
        monkeypatch.setattr(opt, "_no_grouped_mm", set())
        got = m.layers[1].mlp(x)
    assert opt._no_grouped_mm == {"cpu"} and torch.allclose(got, want, atol=1e-5)
