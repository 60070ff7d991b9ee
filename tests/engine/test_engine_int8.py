"""Weight-only int8 decoding: close to float32, through every MoE path, in the engine and the LLM."""

from __future__ import annotations

import pytest
import torch

import dsv2
from dsv2.engine import Engine, Request, SamplingParams
from dsv2.quant.int8 import Int8GroupedExperts, Int8Linear, quantize_int8, quantize_rows

import _tiny


def test_rows_round_to_int8_with_one_scale_each():
    w = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different sizes
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (48,) and q.abs().max() == 127
    back = q.float() * s.float()[:, None]
    assert ((back - w).abs().amax(1) <= 0.51 * s.float() * 1.01 + 1e-6).all()  # half a step (+ bf16 scale)


def model_pair():
    ref = _tiny.random_model(num_hidden_layers=3, moe_intermediate_size=32)
    q = dsv2.DeepseekV2(ref.config).eval()
    q.load_state_dict(ref.state_dict())
    return ref, quantize_int8(q)


def test_quantized_model_logits_close_in_every_path():
    """Prefill (widened weights), decode at batch 1 (int8 matmuls, one-token experts) and at a
    batch (padded experts): logits within a small fraction of their spread of float32's."""
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
    """A layer whose input width is not a multiple of 32 (here the dense FFN's 100) takes the
    widened-weight path at decode sizes too; the quantized model cannot be saved as a checkpoint."""
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
