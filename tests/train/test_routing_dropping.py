"""Device-limited routing bounds each token's groups; dropping respects capacity, affinity, protection."""

import torch

from dsv2.config import ModelConfig
from dsv2.model.moe import Gate, Routing
from dsv2.train.dropping import DropPolicy, capacity_keep, protected_sequences
from dsv2.train.routing import expert_groups, groups_touched, routing_groups


def test_device_limited_routing_never_exceeds_M_groups():
    for D, M, K in ((4, 2, 2), (4, 1, 2), (8, 3, 6), (2, 1, 3)):
        cfg = ModelConfig.from_preset("tiny", hidden_size=32, n_routed_experts=16, n_group=D, topk_group=M,
                                      num_experts_per_tok=K)
        torch.manual_seed(D * 10 + M)
        gate = Gate(cfg)
        torch.nn.init.normal_(gate.weight, std=1.0)
        r = gate(torch.randn(512, 32))
        touched = groups_touched(r.idx_NK, expert_groups(16, D), D)
        assert touched.sum(-1).max() <= M
        assert routing_groups(cfg) == (D, M)
        # and the chosen groups are the ones with the highest max affinity
        top = r.scores_NE.view(512, D, -1).amax(-1).topk(M, dim=-1).indices
        assert torch.zeros(512, D, dtype=torch.bool).scatter_(1, top, True)[touched].all()


def test_greedy_routing_can_exceed_M_and_M_defaults_to_K():
    cfg = ModelConfig.from_preset("tiny", topk_method="greedy", n_group=None, topk_group=None)
    assert routing_groups(cfg, device_groups=4) == (4, 2)


def test_capacity_keeps_each_group_within_capacity_and_drops_lowest_affinity_first():
    torch.manual_seed(0)
    N, K, D, cap = 64, 2, 4, 20
    aff = torch.rand(N, K)
    grp = torch.randint(0, D, (N, K))
    grp[:, 1] = (grp[:, 0] + 1) % D
    keep = capacity_keep(aff, grp, D, cap)
    for d in range(D):
        in_d = grp == d
        assert keep[in_d].sum() == min(cap, int(in_d.sum()))
        if (~keep & in_d).any():  # every dropped copy has lower affinity than every kept one
            assert aff[~keep & in_d].max() <= aff[keep & in_d].min()


def test_protected_sequences_are_never_dropped():
    torch.manual_seed(1)
    N, K, D = 40, 2, 2
    aff = torch.rand(N, K)
    grp = torch.zeros(N, K, dtype=torch.long)   # all copies to group 0: far over capacity
    prot = torch.zeros(N, K, dtype=torch.bool)
    prot[:10] = True
    keep = capacity_keep(aff, grp, D, capacity=15, protected_NK=prot)
    assert keep[:10].all()
    assert keep.sum() == 20  # the 20 protected copies all stay, even over the capacity of 15
    assert keep[10:].sum() == 0


def test_drop_policy_on_a_routing_and_protected_hash():
    ids = torch.arange(10_000)
    frac = protected_sequences(ids, 0.1).float().mean().item()
    assert 0.08 < frac < 0.12
    torch.manual_seed(2)
    B, T, E, K, D = 4, 16, 8, 2, 4
    scores = torch.rand(B * T, E).softmax(-1)
    w, idx = scores.topk(K, dim=-1)
    policy = DropPolicy(expert_groups(E, D), D, capacity_factor=1.0, protect_fraction=0.0)
    policy.set_batch(torch.arange(B))
    keep = policy(Routing(scores, idx, w), torch.Size([B, T, 32]))
    g = expert_groups(E, D)[idx]
    cap = policy.capacity(B * T * K)
    assert all(int(keep[g == d].sum()) <= cap for d in range(D))
