"""float32 matmuls for bfloat16 weights (model/precision.py): taken only where asked, under no grad,
for many rows; the numbers are those of the same rounded weights computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dsv2
from dsv2.model.precision import MIN_ROWS, Linear, float32_matmuls, widen


def models():
    cfg = dsv2.ModelConfig.from_preset("tiny", vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                       moe_intermediate_size=32, intermediate_size=96)
    torch.manual_seed(0)
    m = dsv2.DeepseekV2(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    m = m.bfloat16()
    ref = dsv2.DeepseekV2(cfg).eval()   # float32 with exactly the bf16-rounded weights
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    return m, ref


def test_widening_applies_only_inside_the_context_without_grad_and_for_many_rows():
    x = torch.zeros(MIN_ROWS, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not widen(x)
        with float32_matmuls():
            assert widen(x) and not widen(x[:MIN_ROWS - 1]) and not widen(x.float())
            with torch.enable_grad():
                assert not widen(x)
        assert not widen(x)


def test_bfloat16_prefill_in_float32_matmuls(monkeypatch):
    m, ref = models()
    assert isinstance(m.lm_head, Linear) and isinstance(m.layers[0].self_attn.kv_b_proj, Linear)
    x = torch.randint(2, 256, (2, 80), generator=torch.Generator().manual_seed(1))
    seen = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda a, w, b=None: seen.append(a.dtype) or linear(a, w, b))
    with torch.no_grad():
        want = ref(x)
        plain = m(x)
        n_plain = len(seen)
        with float32_matmuls():
            wide = m(x)
    # The router always scores in float32; the projections are bf16 unless widened, then none is.
    assert torch.bfloat16 in seen[:n_plain]
    assert len(seen) > n_plain and torch.bfloat16 not in seen[n_plain:]
    # Activations are still rounded to bf16 between layers, as in a plain bf16 forward: compare
    # mean errors against the float32 model of the same weights.
    err_wide, err_plain = (wide - want).abs().mean().item(), (plain - want).abs().mean().item()
    assert err_wide < 0.05 * want.std().item()
    assert err_wide <= 1.1 * err_plain, (err_wide, err_plain)
