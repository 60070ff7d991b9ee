"""The fused, chunked LM-head cross-entropy == head + F.cross_entropy, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv2
from dsv2.model import loss as lm_loss


@pytest.mark.parametrize("grad", [True, False])
def test_model_targets_loss_equals_cross_entropy_of_logits(monkeypatch, grad):
    monkeypatch.setattr(lm_loss, "CHUNK_LOGITS", 7 * 256)  # force several chunks of rows
    cfg = dsv2.ModelConfig.from_preset("tiny", vocab_size=256, hidden_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    model = dsv2.DeepseekV2(cfg)
    x = torch.randint(0, 256, (3, 97))
    y = torch.randint(0, 256, (3, 97))
    y[:, ::5] = lm_loss.IGNORE_INDEX
    assert lm_loss.chunk_rows(256) < x.numel() and len(lm_loss._chunks(x.numel(), 256)) > 2
    with torch.set_grad_enabled(grad):
        fused = model(x, targets=y)
        if grad:
            (fused * 0.3).backward()
            got = {n: p.grad.clone() for n, p in model.named_parameters()}
            model.zero_grad()
        ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum", ignore_index=-100)
    assert fused.dtype == torch.float32 and fused.shape == ()
    assert torch.allclose(fused, ref, rtol=1e-5)
    if grad:
        (ref * 0.3).backward()
        for n, p in model.named_parameters():
            assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max()), n


def test_targets_are_checked():
    cfg = dsv2.ModelConfig.from_preset("tiny", vocab_size=256, hidden_size=64, num_hidden_layers=2)
    model = dsv2.DeepseekV2(cfg)
    x = torch.randint(0, 256, (2, 8))
    with pytest.raises(ValueError, match="shape"):
        model(x, targets=torch.randint(0, 256, (2, 9)))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        model(x, targets=torch.full((2, 8), -1))


def test_token_logprobs_by_chunks_equal_log_softmax_and_their_gradients(monkeypatch):
    from dsv2.model import loss as L
    monkeypatch.setattr(L, "CHUNK_LOGITS", 64)          # several chunks even at this size
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 8, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(50, 8, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, 50, (37,), generator=g)
    weight = torch.randn(37, generator=g, dtype=torch.float64)
    for T in (1.0, 0.7):
        logp, ent = L.lm_head_token_logprobs(h, w, y, temperature=T, with_entropy=True)
        ref_all = torch.log_softmax((h @ w.t()) / T, -1)
        ref = ref_all.gather(1, y[:, None])[:, 0]
        assert torch.allclose(logp.double(), ref, atol=1e-6)
        assert torch.allclose(ent.double(), -(ref_all.exp() * ref_all).sum(-1).detach(), atol=1e-5)
        gh, gw = torch.autograd.grad((logp.double() * weight).sum(), (h, w))
        rh, rw = torch.autograd.grad((ref * weight).sum(), (h, w))
        assert torch.allclose(gh, rh, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)
