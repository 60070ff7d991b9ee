"""Weight-only int8 decoding: close to float32, through every MoE path, in the engine and the LLM."""

from __future__ import annotations

import pytest
import torch

import dsv2
from dsv2.engine import Engine, Request, SamplingParams
from dsv2.quant import int8
from dsv2.quant.int8 import Int8GroupedExperts, Int8Linear, integer_products, matmul, quantize_int8, quantize_rows

import _tiny


def test_rows_round_to_int8_with_one_scale_each():
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different sizes
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and q.abs().max() == 127
    back = q.float() * s.float()[:, None]
    assert ((back - w).abs().amax(1) <= 0.51 * s.float() * 1.01 + 1e-6).all()  # half a step (+ bf16 scale)


needs_integer = pytest.mark.skipif(not integer_products(), reason="dsv2's int8 operator is not built here "
                                   "(no C++ compiler, or a CPU without AVX2): int8 layers widen their weights")


@needs_integer
@pytest.mark.parametrize("M,N,K", [(1, 40, 64), (5, 17, 60), (37, 100, 100), (300, 70, 512)])
def test_int8_matmul_rounds_only_the_inputs_to_int16(M, N, K):
    """torch.ops.dsv2.int8_mm against the product with the widened weights: each input row rounded
    to int16 with its own scale s = max|x| / 32767 moves an output by at most s/2 times the sum
    of the row's |weights| (and no further: int8 inputs would be 258x over). Decode widths (1, 5)
    and prefill widths, ragged rows and columns."""
    g = torch.Generator().manual_seed(M)
    x, (q, s) = torch.randn(M, K, generator=g), quantize_rows(torch.randn(N, K, generator=g))
    w = q.float() * s.float()[:, None]
    got, want = matmul(x, q, s), x @ w.T
    bound = 0.5 * (x.abs().amax(1, keepdim=True) / 32767) * w.abs().sum(1)[None] * 1.001 + 1e-5
    assert got.shape == (M, N) and ((got - want).abs() <= bound).all()
    assert (got - want).abs().max() > 0   # rounded: not the float32 product itself


@needs_integer
def test_int8_matmul_keeps_every_int32_lane_exact_past_8256_columns():
    """The worst case for the integer sums: 9,000 columns of weights at +127 against inputs that are
    all the same positive value. Past 8,256 columns the inputs take fewer int16 levels, so no
    int32 lane overflows."""
    x, q, s = torch.full((6, 9000), 0.5), torch.full((20, 9000), 127, dtype=torch.int8), torch.full((20,), 0.01)
    got, want = matmul(x, q, s.bfloat16()), x @ (q.float() * s.bfloat16().float()[:, None]).T
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@needs_integer
def test_int8_matmul_keeps_a_nan_or_infinite_input_from_turning_into_numbers():
    """An input row holding a NaN or an infinity (in the vector loop or its tail) gives no finite
    output, as the float32 product would not; the other rows are untouched."""
    q, s = quantize_rows(torch.randn(20, 100, generator=torch.Generator().manual_seed(0)))
    for bad in (float("nan"), float("inf")):
        for at in (3, 97):
            x = torch.randn(3, 100, generator=torch.Generator().manual_seed(at))
            x[1, at] = bad
            got = matmul(x, q, s)
            assert not torch.isfinite(got[1]).any(), (bad, at)
            assert torch.isfinite(got[[0, 2]]).all(), (bad, at)


def test_without_the_int8_operator_layers_widen_their_weights(monkeypatch):
    """The fallback (no compiler, no AVX2): torch's bfloat16 kernel at decode sizes, the widened
    weights at prefill sizes and at widths it cannot take."""
    monkeypatch.setattr(int8, "_integer", False)
    g = torch.Generator().manual_seed(0)
    for M, K in ((4, 64), (40, 64), (4, 60)):
        x, (q, s) = torch.randn(M, K, generator=g), quantize_rows(torch.randn(24, K, generator=g))
        want = x @ (q.float() * s.float()[:, None]).T
        assert (matmul(x, q, s) - want).abs().max() <= 0.02 * want.abs().max()


def model_pair():
    ref = _tiny.random_model(num_hidden_layers=3, moe_intermediate_size=32)
    q = dsv2.DeepseekV2(ref.config).eval()
    q.load_state_dict(ref.state_dict())
    return ref, quantize_int8(q)


def test_quantized_model_logits_close_in_every_path():
    """Prefill, decode at batch 1 (one-token experts) and at a batch (padded experts): logits within
    a small fraction of their spread of float32's."""
    ref, q = model_pair()
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.layers[1].mlp.experts, Int8GroupedExperts)
    assert isinstance(q.layers[0].self_attn.kv_b_proj, torch.nn.Linear)  # absorbed decode reads it
    x = torch.randint(2, 256, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for rows in (x[:1, :1], x[:, :1], x[:1], x):  # one token, a decode batch, prefills
            a, b = ref(rows), q(rows)
            assert (a - b).abs().max() <= 0.02 * (a.max() - a.min()), rows.shape


def test_engine_decodes_with_int8_weights():
    ref, q = model_pair()
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=0)
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    outs = {}
    for name, m in (("fp32", ref), ("int8", q)):
        eng = Engine(m, max_batch_slots=3, max_len=32, compile=False)
        for i, p in enumerate(prompts):
            eng.add(Request(p, params, id=i))
        got = {i: [] for i in range(3)}
        while eng.seqs:
            for o in eng.step():
                got[o.request_id].append(o.logprob)
        outs[name] = got
    for i in range(3):
        assert len(outs["int8"][i]) == 6
    # The first token of each comes from the same prompt: its logprob moves by the rounding only.
    assert all(abs(outs["int8"][i][0] - outs["fp32"][i][0]) < 0.05 for i in range(3))


def test_llm_quantize_option():
    llm = dsv2.LLM(_tiny.checkpoint(), quantize="int8")
    assert getattr(llm.model, "quantized", None) == "int8"
    [r] = llm.generate(["The quick"], max_new_tokens=4, ignore_eos=True)
    assert len(r.token_ids) == 4
    with pytest.raises(ValueError, match="quantize"):
        dsv2.LLM(_tiny.checkpoint(), quantize="int4")


def test_widths_the_kernel_cannot_take_use_widened_weights(tmp_path):
    """A layer whose input width is not a multiple of 32 (here the dense FFN's 100), which torch's
    int8 kernel cannot take: dsv2's operator takes it (or, without it, the widened weights); the
    quantized model cannot be saved as a checkpoint."""
    cfg = dsv2.ModelConfig.from_preset("tiny", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                       intermediate_size=100, moe_intermediate_size=32)
    torch.manual_seed(0)
    ref = dsv2.DeepseekV2(cfg).eval()
    q = dsv2.DeepseekV2(cfg).eval()
    q.load_state_dict(ref.state_dict())
    quantize_int8(q)
    with torch.no_grad():
        for rows in (1, 4):
            x = torch.randint(2, 256, (rows, 1))
            a, b = ref(x), q(x)
            assert (a - b).abs().max() <= 0.02 * (a.max() - a.min())
    with pytest.raises(ValueError, match="cannot be saved"):
        dsv2.save_pretrained(q, tmp_path)
