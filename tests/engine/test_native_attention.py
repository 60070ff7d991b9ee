"""torch.ops.dsv2.attention (native/attention.cpp): MLA's naive attention for prefill and scoring,
against a float64 reference built from the formula, and inside the engine against SDPA's path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dsv2
from dsv2.engine import Engine, Request, SamplingParams
from dsv2.engine.optimize import prepare_for_decode
from dsv2.native.attention import NativeMLA
from dsv2.model.mask import causal_mask
from dsv2.native import build

from test_native import HAVE_CC, needs_cc

pytestmark = needs_cc


@pytest.fixture(scope="module", autouse=True)
def _built():
    if HAVE_CC:
        build.load()


def inputs(B, T, S, H, N, R, V, dtype, seed=0):
    """q^C, q^R, k^C, k^R, v as the model hands them over: k^C and v views of one decompressed row,
    q^R and k^R slices of one rotated tensor (strided, last dimension contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, N + R, generator=g).to(dtype)
    kv = torch.randn(B, S, H, N + V, generator=g).to(dtype)
    pe = torch.randn(B, S, H + 1, R, generator=g).to(dtype)
    q_nope, q_pe = q.split([N, R], dim=-1)
    k_nope, v = kv.split([N, V], dim=-1)
    return q_nope, q_pe, k_nope, pe[:, :, -1], v


def reference(q_nope, q_pe, k_nope, k_pe, v, mask, scale):
    """softmax(q k^T scale) v in float64, k^R shared by the heads; a row with no visible key -> 0."""
    B, T, H, _ = q_nope.shape
    S = k_nope.shape[1]
    q = torch.cat([q_nope, q_pe], -1).double()
    k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, -1)], -1).double()
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    if mask is None:   # causal, the queries the last T of the S positions
        mask = causal_mask(torch.arange(S - T, S)[None].expand(B, T), S)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = s.softmax(-1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", p, v.double())


def sdpa(q_nope, q_pe, k_nope, k_pe, v, mask, scale):
    """The model's path before: SDPA with k^R copied per head and v padded to the query width."""
    B, T, H, N = q_nope.shape
    S, V = v.shape[1], v.shape[-1]
    q = torch.cat([q_nope, q_pe], -1)
    k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, -1)], -1)
    if mask is None:
        mask = causal_mask(torch.arange(S - T, S)[None].expand(B, T), S)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), F.pad(v, (0, q.shape[-1] - V)).transpose(1, 2),
                                       attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2)[..., :V]


SHAPES = {   # B, T, S, H, N, R, V
    "small_prefill": (1, 200, 200, 8, 32, 64, 32),
    "after_a_prefix": (2, 37, 150, 3, 16, 8, 24),      # a chunk after cached positions, ragged blocks
    "odd_widths": (2, 19, 19, 3, 5, 7, 9),              # no width a multiple of a vector: every tail
    "one_query": (1, 1, 33, 4, 32, 64, 32),
    "v2_lite_heads": (1, 70, 300, 2, 128, 64, 128),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
def test_attention_operator_equals_the_formula(shape, dtype, masked):
    """float32 to rounding; bfloat16 (pairs multiplied in bfloat16 where the CPU can) no further
    from the float64 formula than PyTorch's own bfloat16 SDPA on the same inputs."""
    B, T, S = shape[:3]
    args = inputs(*shape, dtype)
    scale = 1 / math.sqrt(shape[4] + shape[5])
    mask = None
    if masked:   # a sparse random mask, every row with at least one key
        mask = torch.rand(B, T, S, generator=torch.Generator().manual_seed(1)) < 0.2
        mask[..., 0] = True
    got = torch.ops.dsv2.attention(*args, mask, scale)
    assert got.dtype == dtype and got.shape == (B, T, shape[3], shape[6])
    want = reference(*args, mask, scale)
    err = (got.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err < 2e-6 * want.abs().max().item() + 1e-6, err
    else:
        theirs = (sdpa(*args, mask, scale).double() - want).abs().max().item()
        assert err <= 1.5 * theirs + 1e-3, (err, theirs)


def test_rows_that_may_see_no_key_get_zeros_and_the_rest_are_untouched():
    args = inputs(2, 6, 9, 2, 8, 4, 8, torch.float32)
    mask = torch.rand(2, 6, 9, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[:, :, 0] = True
    mask[1, 3] = False
    mask[0, 0] = False
    got = torch.ops.dsv2.attention(*args, mask, 0.3)
    want = reference(*args, mask, 0.3)
    assert torch.equal(got[1, 3], torch.zeros_like(got[1, 3])) and torch.equal(got[0, 0], torch.zeros_like(got[0, 0]))
    assert (got.double() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_windows_far_from_the_block_start_skip_nothing_and_touch_no_other_row(dtype):
    """Segment-style masks (a packed row's later documents, as the trainer packs them): a query
    sees only keys in [its document's start, itself], so whole leading blocks of keys are skipped,
    and a block of queries can straddle documents, its rows' windows starting hundreds of keys
    apart. Also one row that sees only the last of 300 keys beside one that sees them all. The
    results are the formula's (a window start past a block's end once spilled into the next
    rows' scores: NaN in bfloat16, a wrong row in float32)."""
    T = S = 400
    args = inputs(1, T, S, 2, 16, 8, 16, dtype, seed=3)
    seg = (torch.arange(T) >= 170).long() + (torch.arange(T) >= 300).long()
    masks = [causal_mask(torch.arange(T)[None], S, segment_ids_BT=seg[None])]
    far = torch.zeros(1, 2, 300, dtype=torch.bool)
    far[0, 0, -1] = True
    far[0, 1] = True
    masks.append(far)
    for mask in masks:
        a = [t[:, : mask.shape[1]] for t in args[:2]] + [t[:, : mask.shape[2]] for t in args[2:]]
        got = torch.ops.dsv2.attention(*a, mask, 0.25)
        want = reference(*a, mask, 0.25)
        err = (got.double() - want).abs().max().item()
        assert not got.isnan().any()
        assert err < (1e-5 if dtype == torch.float32 else 1.5 * (sdpa(*a, mask, 0.25).double() - want).abs().max().item() + 1e-3)


def test_bad_inputs_are_refused_with_one_sentence():
    qn, qr, kn, kr, v = inputs(1, 4, 6, 2, 8, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        torch.ops.dsv2.attention(qn, qr, kn[:, :5], kr, v, None, 1.0)
    with pytest.raises(ValueError, match="mask must be"):
        torch.ops.dsv2.attention(qn, qr, kn, kr, v, torch.ones(1, 4, 5, dtype=torch.bool), 1.0)
    with pytest.raises(ValueError, match="more queries than keys"):
        torch.ops.dsv2.attention(*inputs(1, 7, 6, 2, 8, 4, 8, torch.float32), None, 1.0)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        torch.ops.dsv2.attention(*(t.half() for t in (qn, qr, kn, kr, v)), None, 1.0)
    with pytest.raises(ValueError, match="k_pe must be"):
        torch.ops.dsv2.attention(qn, qr, kn, kr.bfloat16(), v, None, 1.0)
    with pytest.raises(ValueError, match="at least one column"):
        torch.ops.dsv2.attention(qn, qr, kn, kr, v[..., :0], None, 1.0)


def test_the_operator_passes_opcheck():
    args = inputs(2, 5, 9, 2, 8, 4, 8, torch.float32)
    mask = torch.ones(2, 5, 9, dtype=torch.bool).tril(4)
    for m in (None, mask):
        result = torch.library.opcheck(torch.ops.dsv2.attention.default, (*args, m, 0.5))
        assert set(result.values()) == {"SUCCESS"}, result


def tiny_model(dtype=torch.float32):
    cfg = dsv2.ModelConfig.from_preset("tiny", hidden_size=64, num_hidden_layers=2, q_lora_rank=32, kv_lora_rank=32,
                                       qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                       max_position_embeddings=512)
    torch.manual_seed(0)
    m = dsv2.DeepseekV2(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.1)
    return m.to(dtype)


def test_prepare_for_decode_swaps_every_attention_and_autograd_takes_the_differentiable_pair(monkeypatch):
    m = prepare_for_decode(tiny_model())
    attns = [b.self_attn for b in m.layers]
    assert all(type(a) is NativeMLA for a in attns)
    calls = []
    for name in ("attention", "attention_lse", "attention_backward"):
        real = getattr(torch.ops.dsv2, name)
        monkeypatch.setattr(torch.ops.dsv2, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    x = torch.randint(0, m.config.vocab_size, (1, 20))
    with torch.inference_mode():
        m(x)
    assert calls == ["attention"] * len(attns)
    calls.clear()
    m(x).sum().backward()
    assert calls == ["attention_lse"] * len(attns) + ["attention_backward"] * len(attns)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES["after_a_prefix"], SHAPES["odd_widths"], (2, 150, 150, 4, 32, 64, 32)],
                         ids=["after_a_prefix", "odd_widths", "two_query_blocks"])
@pytest.mark.parametrize("masked", [False, True], ids=["causal", "mask"])
def test_attention_gradients_equal_the_formula(shape, dtype, masked):
    """attention_backward (float32 inside, whatever the inputs) against autograd through the float64
    formula: every input's gradient, k^R's summed over the heads that share it. bfloat16: no further
    from it than autograd through SDPA in bfloat16."""
    from dsv2.native.attention import attention
    B, T, S = shape[:3]
    args = [t.detach().clone().requires_grad_() for t in inputs(*shape, dtype, seed=4)]
    mask = None
    if masked:
        mask = torch.rand(B, T, S, generator=torch.Generator().manual_seed(5)) < 0.3
        mask[..., 0] = True
        mask[0, 1] = False   # a row that sees nothing: no gradient through it
    scale = 1 / math.sqrt(shape[4] + shape[5])
    out = attention(*args, mask, scale)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    got = torch.autograd.grad(out, args, dout)
    ref = [a.detach().double().requires_grad_() for a in args]
    want = torch.autograd.grad(reference(*ref, mask, scale), ref, dout.double())
    if dtype == torch.bfloat16:
        low = [a.detach().clone().requires_grad_() for a in args]
        theirs = torch.autograd.grad(sdpa(*low, mask, scale), low, dout)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == dtype and g.shape == w.shape
        err = (g.double() - w).abs().max().item()
        if dtype == torch.float32:
            assert err < 2e-6 * w.abs().max().item() + 1e-6, (i, err)
        else:
            assert err <= 1.5 * (theirs[i].double() - w).abs().max().item() + 1e-3, (i, err)


def test_a_training_step_through_the_model_matches_sdpa():
    """Loss and every parameter's gradient, float32, packed rows (segment masks) and plain causal
    rows: NativeMLA against the model's SDPA path."""
    from dsv2.native.attention import use_native_attention
    ref = tiny_model().train()
    ours = use_native_attention(tiny_model().train())
    assert all(type(b.self_attn) is NativeMLA for b in ours.layers)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(2, ref.config.vocab_size, (2, 40), generator=g)
    seg = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    for kwargs in ({}, {"segment_ids": seg}):
        losses = []
        for m in (ref, ours):
            m.zero_grad()
            loss = m(x, **kwargs).float().logsumexp(-1).mean()
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5
        for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
            if a.grad is not None:
                assert (a.grad - b.grad).abs().max().item() < 1e-5 * a.grad.abs().max().item() + 1e-7, name


def test_the_trainer_uses_it_on_cpu(tmp_path):
    from dsv2.bench.common import random_shards
    from dsv2.train.config import load_config
    from dsv2.train.loop import Trainer
    data = random_shards(tmp_path, 512, 20_000)
    cfg = load_config("tiny", [f"data.dir={data}", f"out_dir={tmp_path / 'run'}", "export=false", "steps=1"])
    tr = Trainer(cfg, print_fn=lambda *_: None)
    assert all(type(b.self_attn) is NativeMLA for b in tr.model.layers)


def engine_prefill(m, native: bool, prompts, switch: tuple | None = None):
    """The engine's two prefill shapes, with dsv2::attention (or the operators behind `switch`, a
    (module, name of its availability check) pair) on or off: one prompt in chunks of 64 after its
    own cached positions (no mask: causal over the last T keys) -> its last logits; and a padded
    batch of prompts (an explicit mask) -> every layer's cache rows of each prompt (a layer's
    latents are computed from the attention before it)."""
    from dsv2.native import attention
    module, name = switch or (attention, "native_attention")
    saved = getattr(module, name)
    setattr(module, name, lambda: native)
    try:
        a = Engine(m, max_batch_slots=1, max_len=200, prefill_chunk=64, native=False)
        logits = a._prefill(0, prompts[0], 0)[0].float()
        b = Engine(m, max_batch_slots=len(prompts), max_len=200, native=False)
        b.add_many([Request(p, SamplingParams(max_new_tokens=1)) for p in prompts])
        rows = torch.cat([b.cache.widened(layer)[s, : len(p)] for layer in range(m.config.num_hidden_layers)
                          for s, p in enumerate(prompts)])
        return logits, rows
    finally:
        setattr(module, name, saved)


def test_engine_prefill_in_chunks_and_batches_matches_sdpa():
    """float32: dsv2::attention and SDPA agree to rounding. bfloat16: both against the float32
    model, dsv2's no further from it than SDPA's."""
    m = tiny_model()
    prompts = [torch.randint(2, m.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (150, 40, 97)]
    truth = engine_prefill(m, False, prompts)
    ours = engine_prefill(m, True, prompts)
    for x, y in zip(ours, truth):
        assert (x - y).abs().max().item() < 1e-4 * y.abs().max().item()
    m16 = tiny_model(torch.bfloat16)
    ours, theirs = engine_prefill(m16, True, prompts), engine_prefill(m16, False, prompts)
    for x, y, t in zip(ours, theirs, truth):
        assert (x - t).abs().max().item() <= 1.5 * (y - t).abs().max().item() + 1e-3
