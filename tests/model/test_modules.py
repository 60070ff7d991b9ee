"""Module-level checks: RoPE layout, YaRN, MLA's two paths, MoE's fast path and routing."""

from __future__ import annotations

import math

import pytest
import torch

from dsv2 import ModelConfig
from dsv2.engine.cache import LatentCache
from dsv2.model.attention import MLA, KVStep
from dsv2.model.moe import MoE, MoEHooks
from dsv2.model.rope import RotaryEmbedding, apply_rope, rope_inv_freq, softmax_scale

YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
            mscale=0.707, mscale_all_dim=0.707)


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig.from_preset("tiny", **kw)


def test_rope_rotates_interleaved_pairs_like_transformers():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb
    cfg = small_cfg()
    rope = RotaryEmbedding(cfg)
    pos = torch.arange(10)[None]
    cos, sin = rope(pos)
    x = torch.randn(1, 3, 10, cfg.qk_rope_head_dim)  # [B, H, T, R]
    freqs_cis = torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))
    want, _ = apply_rotary_emb(x, x, freqs_cis)
    got = apply_rope(x, cos[:, None], sin[:, None])
    assert torch.allclose(got, want, atol=1e-6)
    # Interleaved layout pinned by hand: the pair (x0, x1) rotates by pos * inv_freq[0].
    v = torch.zeros(cfg.qk_rope_head_dim)
    v[0] = 1.0
    out = apply_rope(v[None, None], *[t[:, 3:4] for t in rope(pos)])
    assert torch.allclose(out[0, 0, :2], torch.tensor([math.cos(3.0), math.sin(3.0)]), atol=1e-6)


def test_yarn_frequencies_and_softmax_scale_match_transformers():
    from transformers import DeepseekV2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = ModelConfig.from_preset("deepseek-v2")
    ours, amp = rope_inv_freq(cfg)
    hf_cfg = DeepseekV2Config(qk_rope_head_dim=64, rope_scaling=dict(YARN), max_position_embeddings=163840)
    want, hf_amp = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
    assert torch.allclose(ours, want, rtol=1e-6)
    assert amp == pytest.approx(hf_amp)
    # Short wavelengths keep their frequency, long ones are divided by s = 40.
    base, _ = rope_inv_freq(ModelConfig.from_preset("deepseek-v2", rope_scaling=None))
    assert ours[0] == base[0] and ours[-1] == pytest.approx(base[-1] / 40)
    # Softmax scale: 1/sqrt(192) * (0.1 * 0.707 * ln 40 + 1)^2  (sqrt(1/t) = 0.0707 ln s + 1).
    assert softmax_scale(cfg) == pytest.approx(192 ** -0.5 * (0.0707 * math.log(40) + 1) ** 2, rel=1e-3)


@pytest.mark.parametrize("q_lora_rank", [96, None])
def test_absorbed_attention_equals_naive(q_lora_rank):
    cfg = small_cfg(q_lora_rank=q_lora_rank, rope_scaling=dict(YARN, original_max_position_embeddings=8, factor=4))
    torch.manual_seed(0)
    attn = MLA(cfg).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.1)
    rope = RotaryEmbedding(cfg)
    B, T = 3, 12
    x = torch.randn(B, T, cfg.hidden_size)
    pos = torch.arange(T)[None].expand(B, T)
    cos, sin = rope(pos)
    with torch.no_grad():
        naive = attn(x, cos, sin)
        absorbed = attn(x, cos, sin, absorb=True)
        assert (naive - absorbed).abs().max() < 1e-4
        # Through a cache: prefill 8 tokens, then decode 4 one at a time with both paths.
        for absorb in (False, True):
            kv = LatentCache(cfg, B, 16, torch.float32).layers()[0]
            outs = [attn(x[:, :8], cos[:, :8], sin[:, :8], kv, KVStep.causal(pos[:, :8], 8), absorb=False)]
            for t in range(8, T):
                step = KVStep.causal(pos[:, t:t + 1], t + 1)
                outs.append(attn(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], kv, step, absorb=absorb))
            assert (torch.cat(outs, 1) - naive).abs().max() < 1e-4


def make_moe(**kw) -> MoE:
    cfg = small_cfg(**kw)
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return moe


@pytest.mark.parametrize("kw", [{}, dict(topk_method="greedy", n_group=None, topk_group=None),
                                dict(norm_topk_prob=True), dict(routed_scaling_factor=16.0)])
def test_moe_grouped_path_equals_reference_loop(kw):
    moe = make_moe(**kw)
    x = torch.randn(2, 9, moe.gate.weight.shape[1])
    with torch.no_grad():
        fast, ref = moe(x), moe.reference_forward(x)
    assert (fast - ref).abs().max() <= 1e-5 * ref.abs().max()  # float32 summation order only


def test_moe_backward_reaches_gate_and_experts():
    moe = make_moe()
    x = torch.randn(2, 5, moe.gate.weight.shape[1], requires_grad=True)
    moe(x).square().sum().backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.experts.gate_up_proj.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("counts", [[3, 0, 5, 1, 0, 2, 4, 1], [0] * 8])
def test_grouped_experts_backward_equals_autograd_loop(counts):
    """The hand-written backward of the grouped experts == autograd through a per-expert loop,
    including experts that received no rows (their weight gradients are zero)."""
    experts = make_moe(n_routed_experts=8).experts
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(sum(counts), experts.gate_up_proj.shape[-1], requires_grad=True)
    dy = torch.randn(x.shape)
    (experts(x, counts) * dy).sum().backward()
    fast = [t.grad.clone() for t in (x, experts.gate_up_proj, experts.down_proj)]
    for t in (x, experts.gate_up_proj, experts.down_proj):
        t.grad = None
    ref = [experts.expert(e, xe) for e, xe in enumerate(x.split(counts))]
    (torch.cat(ref) * dy).sum().backward()
    for a, b in zip(fast, (x.grad, experts.gate_up_proj.grad, experts.down_proj.grad)):
        scale = b.abs().max() if b.numel() else 0.0
        assert a.shape == b.shape and (a - b).abs().sum() <= 1e-5 * scale * b.numel()  # summation order only
    assert fast[1][1].abs().sum() == 0 and (sum(counts) == 0 or fast[1][0].abs().sum() > 0)


def test_group_limited_routing_uses_at_most_topk_group_groups():
    moe = make_moe(n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=6)
    route = moe.gate(torch.randn(500, moe.gate.weight.shape[1]))
    groups = route.idx_NK // 2
    assert max(len(set(g.tolist())) for g in groups) <= 3
    # The chosen groups are those with the highest max affinity.
    best = route.scores_NE.view(500, 8, 2).amax(-1).topk(3).indices
    for g, b in zip(groups[:50], best[:50]):
        assert set(g.tolist()) <= set(b.tolist())


def test_moe_keep_mask_drops_only_routed_contribution():
    moe = make_moe()
    x = torch.randn(1, 6, moe.gate.weight.shape[1])
    moe.train()

    class DropAll(MoEHooks):
        def keep(self, moe, route, shape):
            return torch.zeros_like(route.idx_NK, dtype=torch.bool)
    with torch.no_grad():
        dropped = moe(x, DropAll())
        assert torch.allclose(dropped, moe.shared_experts(x))
        # Dropping is for training forwards: in eval mode the same hooks keep every copy.
        moe.eval()
        assert torch.allclose(moe(x, DropAll()), moe(x))


@pytest.mark.parametrize("absorb", [False, True])
def test_packed_rows_and_kept_positions_equal_the_padded_forward(absorb):
    """KVStep's layout: sequences packed into one row without padding, attention over padded rows,
    give the padded batch's hidden states; `rows` keeps only some positions' final states."""
    from dsv2.model.mask import causal_mask
    from dsv2.model.transformer import DeepseekV2
    torch.manual_seed(0)
    model = DeepseekV2(small_cfg()).eval()
    lens, T = [7, 4, 2], 7
    x = torch.randint(2, model.config.vocab_size, (len(lens), T))
    pos = torch.arange(T)[None].expand(len(lens), T)
    real = torch.arange(T)[None] < torch.tensor(lens)[:, None]
    with torch.no_grad():
        padded = model.hidden_states(x, pos, step=KVStep(pos, T, causal_mask(pos, T) & real[:, None]), absorb=absorb)
        starts = [sum(lens[:b]) for b in range(len(lens))]
        layout = torch.tensor([[s + min(t, n - 1) for t in range(T)] for s, n in zip(starts, lens)])
        slots = torch.cat([torch.arange(n) + b * T for b, n in enumerate(lens)])
        packed_pos = torch.cat([torch.arange(n) for n in lens])[None]
        step = KVStep(packed_pos, sum(lens), causal_mask(pos, T) & real[:, None], layout, slots)
        packed = model.hidden_states(x[real][None], packed_pos, step=step, absorb=absorb)
        assert torch.allclose(packed[0], padded[real], atol=1e-5)
        rows = torch.tensor([[12, 0, 6, 9]])
        kept = model.hidden_states(x[real][None], packed_pos, step=step, absorb=absorb, rows=rows)
        assert torch.allclose(kept, packed[:, rows[0]], atol=1e-5)
