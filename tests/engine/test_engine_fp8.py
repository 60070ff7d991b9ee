"""Decoding with block-scaled FP8 weights in the fused CPU step."""

from __future__ import annotations

from dsv2.engine import Engine, Request, SamplingParams
from dsv2.quant.fp8 import quantize_fp8

import _tiny


def test_fused_decode_reads_fp8_blocks_as_pytorch_widens_them():
    """The fused step with float8 weights (gate and up blocked apart, blocks smaller than the
    matrices, an edge block cut short) equals decoding with PyTorch ops over the same weights."""
    m = quantize_fp8(_tiny.random_model(hidden_size=96, num_hidden_layers=3, moe_intermediate_size=48), block=(32, 64))
    assert m.layers[1].mlp.experts.gate_up_proj_scale_inv.shape[1:] == (4, 2)   # 48 = 32 + 16 rows, 96 = 64 + 32 columns
    params = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=0)
    runs = {}
    for native in (True, False):
        eng = Engine(m, max_batch_slots=3, max_len=40, native=native)
        assert (eng._decode.native is not None) == native
        for i, p in enumerate([[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15]]):
            eng.add(Request(p, params, id=i))
        got = {}
        while eng.seqs:
            for o in eng.step():
                got.setdefault(o.request_id, []).append((o.token_id, o.logprob))
        runs[native] = got
    for i in range(3):
        assert [t for t, _ in runs[True][i]] == [t for t, _ in runs[False][i]]
        assert max(abs(a - b) for (_, a), (_, b) in zip(runs[True][i], runs[False][i])) < 1e-3
