"""The three balance losses against their closed forms, perfect balance, and gradient flow."""

import pytest
import torch

from dsv2.train.balance import balance_losses, comm_balance, device_balance, expert_balance
from dsv2.model.moe import MoEHooks
from dsv2.train.routing import expert_groups


class Recorder(MoEHooks):
    def record(self, moe, route, keep):
        self.route = route


def _hand_routing():
    # 1 sequence, T = 2 tokens, E = 4 experts in D = 2 groups {0,1} {2,3}, K = 2, M = 1.
    scores = torch.tensor([[[0.4, 0.3, 0.2, 0.1],
                            [0.1, 0.2, 0.3, 0.4]]])
    idx = torch.tensor([[[0, 1], [2, 0]]])
    return scores, idx


def test_expert_balance_closed_form():
    scores, idx = _hand_routing()
    # counts per expert: e0 2, e1 1, e2 1, e3 0;  f_i = N_r/(K_r T) count = 4/4 count = count
    f = torch.tensor([2.0, 1.0, 1.0, 0.0])
    P = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert expert_balance(scores, idx, 0.5).item() == pytest.approx(0.5 * float((f * P).sum()))  # = 0.5


def test_device_and_comm_balance_closed_form():
    scores = torch.tensor([[[0.5, 0.2, 0.2, 0.1],
                            [0.6, 0.3, 0.05, 0.05]]])
    idx = torch.tensor([[[0, 1], [0, 2]]])
    g = expert_groups(4, 2)
    f = torch.tensor([2.0, 1.0, 1.0, 0.0])                  # 4/(2*2) x counts
    P = scores[0].mean(0)                                   # [0.55, 0.25, 0.125, 0.075]
    f_dev = torch.tensor([(f[0] + f[1]) / 2, (f[2] + f[3]) / 2])
    P_dev = torch.tensor([P[0] + P[1], P[2] + P[3]])
    assert device_balance(scores, idx, g, 2, 2.0).item() == pytest.approx(2.0 * float((f_dev * P_dev).sum()))
    # token 0 reaches group 0 only; token 1 groups 0 and 1.  f'' = D/(M T) x tokens sent = 2/(1*2) x [2, 1]
    f_comm = torch.tensor([2.0, 1.0])
    assert comm_balance(scores, idx, g, 2, 1, 3.0).item() == pytest.approx(3.0 * float((f_comm * P_dev).sum()))
    # Dropped copies are not sent. Token 0 keeps e1 (group 0) of its two group-0 copies; token 1
    # keeps e0 (group 0) and loses e2, its only copy to group 1: f'' = 2/(1*2) x [2, 0].
    keep = torch.tensor([[[False, True], [True, False]]])
    f_sent = torch.tensor([2.0, 0.0])
    assert comm_balance(scores, idx, g, 2, 1, 3.0, keep).item() == pytest.approx(
        3.0 * float((f_sent * P_dev).sum()))
    assert comm_balance(scores, idx, g, 2, 1, 3.0, torch.ones_like(keep)).item() == pytest.approx(
        3.0 * float((f_comm * P_dev).sum()))


def test_losses_average_over_sequences():
    scores, idx = _hand_routing()
    two = balance_losses(torch.cat([scores, scores.flip(-1)]), torch.cat([idx, 3 - idx]), expert_groups(4, 2), 2, 1,
                         1.0, 1.0, 1.0)
    one_a = balance_losses(scores, idx, expert_groups(4, 2), 2, 1, 1.0, 1.0, 1.0)
    one_b = balance_losses(scores.flip(-1), 3 - idx, expert_groups(4, 2), 2, 1, 1.0, 1.0, 1.0)
    for k in two:
        assert two[k].item() == pytest.approx((one_a[k].item() + one_b[k].item()) / 2)


def test_perfect_balance_equals_coefficient():
    # E = 8 in D = 4 groups of 2, K = 2, M = 2: token t picks experts t and t + 2 (mod 8), i.e. groups
    # t//2 and t//2 + 1: every expert is chosen twice, every group reached by 4 tokens, uniform scores.
    T, E, D = 8, 8, 4
    idx = torch.tensor([[[t % E, (t + 2) % E] for t in range(T)]])
    scores = torch.full((1, T, E), 1.0 / E)
    g = expert_groups(E, D)
    M = 2
    losses = balance_losses(scores, idx, g, D, M, 0.003, 0.05, 0.02)
    assert losses["exp_bal"].item() == pytest.approx(0.003)
    assert losses["dev_bal"].item() == pytest.approx(0.05)
    assert losses["comm_bal"].item() == pytest.approx(0.02)


def test_zero_coefficient_turns_a_loss_off():
    scores, idx = _hand_routing()
    assert set(balance_losses(scores, idx, expert_groups(4, 2), 2, 1, 0.0, 0.1, 0.0)) == {"dev_bal"}


def test_gradients_flow_through_the_gate():
    from dsv2.config import ModelConfig
    from dsv2.model.moe import MoE
    cfg = ModelConfig.from_preset("tiny", hidden_size=32, moe_intermediate_size=16)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rules = Recorder()
    x = torch.randn(2, 5, 32)
    moe(x, rules)
    r = rules.route
    g = expert_groups(cfg.n_routed_experts, cfg.n_group)
    loss = sum(balance_losses(r.scores_NE.view(2, 5, -1), r.idx_NK.view(2, 5, -1), g, cfg.n_group, cfg.topk_group,
                              0.003, 0.05, 0.02).values())
    loss.backward()
    assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_gate_affinities_stay_float32_under_bf16_autocast():
    # balance losses and dropping read these scores: bf16 would round them (ties, biased f/P)
    from dsv2.config import ModelConfig
    from dsv2.model.moe import Gate
    gate = Gate(ModelConfig.from_preset("tiny"))
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(8, gate.weight.shape[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = gate(x)
    assert r.scores_NE.dtype == torch.float32
    torch.testing.assert_close(r.scores_NE, gate(x).scores_NE)


def test_padding_counts_in_no_balance_loss():
    """A row padded at the end gives the losses of the same row without its padding."""
    from dsv2.train.balance import balance_losses
    g = torch.Generator().manual_seed(0)
    B, T, E, K, D = 3, 10, 8, 2, 4
    scores = torch.rand(B, T, E, generator=g).softmax(-1)
    idx = torch.rand(B, T, E, generator=g).topk(K, -1).indices
    group = torch.arange(E) // (E // D)
    lens = [10, 6, 3]
    valid = torch.arange(T)[None] < torch.tensor(lens)[:, None]
    padded = balance_losses(scores, idx, group, D, 2, 0.1, 0.2, 0.3, valid_BT=valid)
    for k in padded:
        alone = sum(balance_losses(scores[b:b + 1, :n], idx[b:b + 1, :n], group, D, 2, 0.1, 0.2, 0.3)[k]
                    for b, n in enumerate(lens)) / B
        assert torch.allclose(padded[k], alone), k
    unmasked = balance_losses(scores, idx, group, D, 2, 0.1, 0.2, 0.3)
    assert not torch.allclose(unmasked["exp_bal"], padded["exp_bal"])
