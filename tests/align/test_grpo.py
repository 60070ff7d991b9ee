"""GRPO's objective against its formulas: advantages, the clip, the gradient, k3, masking, aggregation."""

from __future__ import annotations

import pytest
import torch

from dsv2.align.grpo import clip_active, group_advantages, grpo_loss, k3_kl, process_advantages


def test_group_advantages():
    a = group_advantages(torch.tensor([1.0, 0, 1, 0]), 4)
    std = torch.tensor([1.0, 0, 1, 0]).std().item()                  # Bessel: 0.5774
    assert std == pytest.approx(0.57735, abs=1e-5)
    assert torch.allclose(a, torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-4))
    const = group_advantages(torch.tensor([3.0, 3, 3, 1, 2, 3]), 3)
    assert torch.equal(const[:3], torch.zeros(3)) and not torch.isnan(const).any()
    assert torch.allclose(group_advantages(torch.tensor([1.0, 3, 5, 7]), 2, scale="none"), torch.tensor([-1.0, 1, -1, 1]))
    batch = group_advantages(torch.tensor([1.0, 3, 5, 7]), 2, scale="batch")
    assert torch.allclose(batch, torch.tensor([-1.0, 1, -1, 1]) / (torch.tensor([1.0, 3, 5, 7]).std() + 1e-4))
    with pytest.raises(ValueError, match="6 rewards do not split into groups of 4"):
        group_advantages(torch.ones(6), 4)


def test_process_advantages_are_suffix_sums_of_normalised_step_rewards():
    adv = process_advantages([[1.0, 0.0], [0.0]], [[1, 3], [2]], group_size=2, length=5)
    r = torch.tensor([1.0, 0.0, 0.0])
    n = (r - r.mean()) / (r.std() + 1e-4)
    assert torch.allclose(adv[0], torch.tensor([n[0] + n[1], n[0] + n[1], n[1], n[1], 0]))
    assert torch.allclose(adv[1], torch.tensor([n[2], n[2], n[2], 0, 0]))


def test_clip_is_active_exactly_where_the_clipped_branch_is_flat():
    ratio = torch.tensor([[0.5, 0.9, 1.0, 1.1, 1.5], [0.5, 0.9, 1.0, 1.1, 1.5]])
    adv = torch.tensor([1.0, -1.0])
    want = torch.tensor([[False, False, False, False, True], [True, False, False, False, False]])
    assert torch.equal(clip_active(ratio, adv), want)
    # the gradient of the objective through logp is zero exactly there
    logp = torch.log(ratio).requires_grad_()
    loss = grpo_loss(logp, torch.zeros_like(logp), None, adv, torch.ones_like(logp), beta=0.0, agg="token")
    loss.backward()
    assert torch.equal(logp.grad == 0, want)
    assert torch.equal(clip_active(ratio, adv, eps_high=0.6)[0], torch.zeros(5, dtype=torch.bool))


def test_with_one_update_and_no_kl_the_gradient_is_minus_mean_advantage_times_grad_logp():
    torch.manual_seed(0)
    w = torch.randn(6, 10, requires_grad=True)
    x = torch.randn(4, 5, 6)
    tokens = torch.randint(0, 10, (4, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -0.5, 2.0, -2.5])

    def logp_of(w):
        return torch.log_softmax(x @ w, -1).gather(-1, tokens[..., None])[..., 0]
    logp = logp_of(w)
    loss = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    g, = torch.autograd.grad(loss, w)
    m = mask.float()
    ref = -(adv * (logp_of(w) * m).sum(1) / m.sum(1)).mean()        # -mean_i A_i/|o_i| sum_t log pi
    g_ref, = torch.autograd.grad(ref, w)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_k3_is_non_negative_and_unbiased():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(20, generator=g), 0)
    q = torch.softmax(torch.randn(20, generator=g), 0)
    exact = float((p * (p.log() - q.log())).sum())                   # KL(p || q)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    k3 = k3_kl(p.log()[samples], q.log()[samples])
    assert (k3 >= 0).all()
    assert abs(float(k3.mean()) - exact) < 0.01 * exact
    d = torch.linspace(-5, 5, 101)
    assert (k3_kl(torch.zeros(101), d) >= 0).all() and k3_kl(torch.zeros(1), torch.zeros(1)).item() == 0


def test_padding_after_eos_gets_no_gradient():
    logp = torch.randn(3, 6, requires_grad=True)
    ref = torch.randn(3, 6)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    for agg in ("grpo", "token", "constant"):
        loss = grpo_loss(logp, logp.detach() + 0.1, ref, torch.tensor([1.0, -1, 0.5]), mask, beta=0.04, agg=agg)
        grad, = torch.autograd.grad(loss, logp)
        assert (grad[~mask] == 0).all() and (grad[mask] != 0).any(), agg


def test_aggregations_on_outputs_of_unequal_length():
    """One long output and one short, both with per-token term 1: the aggregations weigh them differently."""
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, 2.0])          # per-token surrogate = A at ratio 1
    grpo = grpo_loss(logp, logp, None, adv, mask, beta=0.0, agg="grpo")
    token = grpo_loss(logp, logp, None, adv, mask, beta=0.0, agg="token")
    const, stats = grpo_loss(logp, logp, None, adv, mask, beta=0.0, agg="constant", max_len=8, return_stats=True)
    assert stats["clip_ratio"] == 0 and stats["kl"] == 0
    assert grpo.item() == pytest.approx(-(1 + 2) / 2)                # each output's mean, then over outputs
    assert token.item() == pytest.approx(-(4 * 1 + 2) / 5)           # every token counts once
    assert const.item() == pytest.approx(-(4 * 1 + 2) / (2 * 8))     # outputs x a fixed length
    with pytest.raises(ValueError, match="beta > 0 needs the reference"):
        grpo_loss(logp, logp, None, adv, mask, beta=0.1)
