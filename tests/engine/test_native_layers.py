"""torch.ops.dsv2.rms_norm, rope and moe_combine (native/layers.cpp) and their backwards: against
float64 references built from the formulas, against the model's PyTorch code in bfloat16, inside a
training step and the engine's prefill, and through their checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import dsv2
from dsv2.engine.optimize import DecodeMoE, prepare_for_decode
from dsv2.model.moe import DispatchState, LocalDispatcher, MoE, MoEHooks
from dsv2.model.norm import RMSNorm
from dsv2.model.rope import apply_rope
from dsv2.native import build, layers
from dsv2.native.attention import use_native_attention
from dsv2.native.layers import NativeDispatcher, NativeRMSNorm, moe_combine, rms_norm, rope, use_native_layers

from test_native import HAVE_CC, needs_cc
from test_native_attention import engine_prefill

pytestmark = needs_cc
TYPES = [torch.float32, torch.bfloat16]
SWITCH = (layers, "native_layers")   # engine_prefill's on/off switch for these operators


@pytest.fixture(scope="module", autouse=True)
def _built():
    if HAVE_CC:
        build.load()


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def grads(f, args, dout):
    """d(f(args) . dout)/d(args) for the args that require grad (None for the rest)."""
    out = f(*args)
    return torch.autograd.grad(out, [a for a in args if a.requires_grad], dout.to(out.dtype))


def leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


# ------------------------------------------------------------------------------------ RMSNorm
def norm_formula(x, w, eps):
    x = x.double()
    return w.double() * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def norm_model(x, w, eps):
    """model/norm.py's forward on these very tensors (so autograd reaches them)."""
    return RMSNorm.forward(SimpleNamespace(weight=w, eps=eps), x)


def norm_inputs(x_dtype, w_dtype, D=67, eps=1e-6):
    """Rows of every scale (one all zero, some far below sqrt(eps)), a strided view as the model's
    split c^KV is; a weight near 1."""
    x = randn(3, 11, D + 5, seed=1) * torch.logspace(-5, 2, 11)[None, :, None]
    x[1, 4] = 0
    return x[..., :D].to(x_dtype), (1 + randn(D, seed=2) * 0.3).to(w_dtype), eps


@pytest.mark.parametrize("w_dtype", TYPES)
@pytest.mark.parametrize("x_dtype", TYPES)
@pytest.mark.parametrize("eps", [1e-6, 1e-2])
def test_rms_norm_equals_the_formula(x_dtype, w_dtype, eps):
    """float32: to rounding; bfloat16 anywhere: the model's own roundings, so no further from the
    float64 formula than model/norm.py on the same inputs. The output dtype is the model's."""
    x, w, eps = norm_inputs(x_dtype, w_dtype, eps=eps)
    got, ref = rms_norm(x, w, eps), norm_model(x, w, eps)
    assert got.dtype == ref.dtype and got.shape == x.shape
    want = norm_formula(x, w, eps)
    if got.dtype == torch.float32 and x_dtype == torch.float32:
        assert err(got, want) < 1e-6 * want.abs().max().item()
    else:
        assert err(got, want) <= 1.01 * err(ref, want) + 1e-6
        assert (got != ref).float().mean() < 0.01   # the same roundings: equal but for a rare last bit


@pytest.mark.parametrize("w_dtype", TYPES)
@pytest.mark.parametrize("x_dtype", TYPES)
def test_rms_norm_gradients_equal_the_formula(x_dtype, w_dtype):
    x, w, eps = norm_inputs(x_dtype, w_dtype, D=40, eps=1e-3)
    x, w = leaf(x), leaf(w)
    dy = randn(x.shape, seed=3)
    got = grads(lambda a, b: rms_norm(a, b, eps), (x, w), dy)
    ref64 = (leaf(x.double()), leaf(w.double()))
    want = grads(lambda a, b: norm_formula(a, b, eps), ref64, dy.double())
    theirs = grads(lambda a, b: norm_model(a, b, eps), (leaf(x), leaf(w)), dy)
    for g, w_, t, a in zip(got, want, theirs, (x, w)):
        assert g.dtype == a.dtype and g.shape == a.shape
        if a.dtype == torch.float32 and x_dtype == w_dtype == torch.float32:
            assert err(g, w_) < 1e-5 * w_.abs().max().item()
        else:
            assert err(g, w_) <= 1.5 * err(t, w_) + 1e-6


def test_rms_norm_of_a_batch_of_one_row_and_of_many_rows():
    """One row (a decode step: one thread) and many (the threads split the rows and their dweight)."""
    w = 1 + randn(96, seed=4)
    for rows in (1, 1000):
        x = leaf(randn(rows, 96, seed=5))
        dy = randn(rows, 96, seed=6)
        got = grads(lambda a, b: rms_norm(a, b, 1e-6), (x, leaf(w)), dy)
        want = grads(lambda a, b: norm_formula(a, b, 1e-6), (leaf(x.double()), leaf(w.double())), dy.double())
        for g, w_ in zip(got, want):
            assert err(g, w_) < 1e-5 * w_.abs().max().item()


# --------------------------------------------------------------------------------------- RoPE
def rope_formula(x, cos, sin):
    """x [B, T, H, R] or [B, T, R], pairs (x[2i], x[2i+1]) rotated by (cos, sin) [B, T, R/2], float64."""
    c, s = (t.double() if x.dim() == 3 else t.double()[:, :, None] for t in (cos, sin))
    x0, x1 = x.double()[..., 0::2], x.double()[..., 1::2]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2)


def rope_inputs(dtype, B=2, T=5, H=3, R=70, amplitude=1.3):
    """x as the model's forward hands it over (a slice of a wider tensor), cos/sin with YaRN's
    amplitude (so the backward's transpose differs from the inverse rotation)."""
    x = randn(B, T, H + 1, R + 6, dtype=dtype, seed=7)[:, :, :H, 3: 3 + R]
    angles = randn(B, T, R // 2, seed=8) * 3
    return x, angles.cos() * amplitude, angles.sin() * amplitude


@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("R", [64, 70, 6], ids=["vectors", "tail", "short"])
def test_rope_equals_the_formula(dtype, R):
    x, cos, sin = rope_inputs(dtype, R=R)
    for xx in (x, x[:, :, 1]):   # the heads' queries, the shared key
        got = rope(xx, cos, sin)
        assert got.dtype == dtype and got.shape == xx.shape
        want = rope_formula(xx, cos, sin)
        ref = apply_rope(xx, *((cos, sin) if xx.dim() == 3 else (cos[:, :, None], sin[:, :, None])))
        if dtype == torch.float32:
            assert err(got, want) < 1e-6 * want.abs().max().item()
        else:
            assert err(got, want) <= 1.01 * err(ref, want) + 1e-6


def test_rope_broadcasts_a_batch_of_one_and_rotates_back_with_inverse():
    x, cos, sin = rope_inputs(torch.float32, B=3, amplitude=1.0)
    got = rope(x, cos[:1], sin[:1])
    assert err(got, rope_formula(x, cos[:1].expand(3, -1, -1), sin[:1].expand(3, -1, -1))) < 1e-5
    back = torch.ops.dsv2.rope(got, cos[:1].expand(3, -1, -1), sin[:1].expand(3, -1, -1), True)
    assert err(back, x) < 1e-5


@pytest.mark.parametrize("dtype", TYPES)
def test_rope_gradients_equal_the_formula(dtype):
    """The backward is the transposed rotation (with YaRN's amplitude, not the inverse one)."""
    x, cos, sin = rope_inputs(dtype)
    dout = randn(x.shape, seed=9)
    for xx, d in ((x, dout), (x[:, :, 0], dout[:, :, 0])):
        got, = grads(lambda a: rope(a, cos, sin), (leaf(xx),), d)
        want, = grads(lambda a: rope_formula(a, cos, sin), (leaf(xx.double()),), d.double())
        c, s = (cos, sin) if xx.dim() == 3 else (cos[:, :, None], sin[:, :, None])
        theirs, = grads(lambda a: apply_rope(a, c, s), (leaf(xx),), d)
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert err(got, want) < 1e-5 * want.abs().max().item()
        else:
            assert err(got, want) <= 1.01 * err(theirs, want) + 1e-6


# ------------------------------------------------------------------------------------ combine
def combine_formula(y_MD, order_M, weight_NK):
    """out[n] = sum_k w[n, k] y[m] over order[m] = n K + k, float64, by a loop over the rows."""
    N, K = weight_NK.shape
    out = torch.zeros(N, y_MD.shape[1], dtype=torch.float64)
    w = weight_NK.double().flatten()
    for m, slot in enumerate(order_M.tolist()):
        out[slot // K] = out[slot // K] + w[slot] * y_MD[m].double()
    return out


def combine_inputs(dtype, N=37, K=4, D=71, drop=False):
    """A routing's order (copies sorted by expert) and float32 gate weights; with drop, a third of the
    copies missing from order and one token with all its copies gone."""
    g = torch.Generator().manual_seed(10)
    idx = torch.rand(N, 16, generator=g).argsort(-1)[:, :K]
    keep = torch.rand(N, K, generator=g) > 0.33 if drop else torch.ones(N, K, dtype=torch.bool)
    keep[5] = not drop
    flat = torch.where(keep.flatten(), idx.flatten(), 16)
    order = flat.argsort(stable=True)[: int(keep.sum())]
    return randn(order.shape[0], D, dtype=dtype, seed=11), order, torch.rand(N, K, generator=g)


@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("drop", [False, True], ids=["all_copies", "dropped_copies"])
def test_moe_combine_and_its_gradients_equal_the_formula(dtype, drop):
    """Forward and both gradients: float32 to rounding; bfloat16 no further from the float64 formula
    than LocalDispatcher.combine (which rounds the weights to bfloat16 first)."""
    y, order, w = combine_inputs(dtype, drop=drop)
    N = w.shape[0]
    state = DispatchState(order, order // w.shape[1])
    dout = randn(N, y.shape[1], seed=12)
    args = (leaf(y), order, leaf(w))
    got = moe_combine(*args)
    assert got.dtype == dtype and got.shape == (N, y.shape[1])
    want = combine_formula(y, order, w)
    if drop:
        assert torch.equal(got[5], torch.zeros_like(got[5]))
    g_got = torch.autograd.grad(got, (args[0], args[2]), dout.to(dtype))
    g_want = grads(combine_formula, (leaf(y.double()), order, leaf(w.double())), dout.double())
    ty, tw = leaf(y), leaf(w)
    theirs = LocalDispatcher().combine(ty, state, tw, N)
    g_theirs = torch.autograd.grad(theirs, (ty, tw), dout.to(dtype))
    if dtype == torch.float32:
        assert err(got, want) < 1e-6 * want.abs().max().item()
        for g, w_ in zip(g_got, g_want):
            assert err(g, w_) < 1e-5 * w_.abs().max().item()
    else:
        assert err(got, want) <= 1.01 * err(theirs, want) + 1e-6
        for g, w_, t in zip(g_got, g_want, g_theirs):
            assert err(g, w_) <= 1.01 * err(t, w_) + 1e-6
    assert g_got[0].dtype == dtype and g_got[1].dtype == torch.float32


def test_native_dispatcher_round_trip_equals_the_local_one():
    d = NativeDispatcher()
    x = randn(20, 33, seed=13)
    idx = torch.rand(20, 8, generator=torch.Generator().manual_seed(14)).argsort(-1)[:, :3]
    w = torch.rand(20, 3, generator=torch.Generator().manual_seed(15))
    x_MD, counts, state = d.dispatch(x, idx, 8)
    y = x_MD * 2
    assert err(d.combine(y, state, w, 20), LocalDispatcher().combine(y, state, w, 20)) < 1e-5


# ----------------------------------------------------------------------------- their checks
def test_every_operator_passes_opcheck():
    x, w, eps = norm_inputs(torch.bfloat16, torch.float32, D=16)
    x = x.reshape(-1, 16)
    y, rstd = torch.ops.dsv2.rms_norm(x, w, eps)
    xr, cos, sin = rope_inputs(torch.float32, R=8)
    yc, order, wc = combine_inputs(torch.float32, N=9, K=3, D=20, drop=True)
    cases = [(torch.ops.dsv2.rms_norm.default, (x, w, eps)),
             (torch.ops.dsv2.rms_norm_backward.default, (randn(y.shape, seed=16), x, w, rstd)),
             (torch.ops.dsv2.rope.default, (xr, cos, sin, False)),
             (torch.ops.dsv2.rope.default, (xr, cos, sin, True)),
             (torch.ops.dsv2.moe_combine.default, (yc, order, wc)),
             (torch.ops.dsv2.moe_combine_backward.default, (randn(9, 20, seed=17), yc, order, wc))]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_bad_inputs_are_refused_with_one_sentence():
    x, w = randn(4, 8), torch.ones(8)
    with pytest.raises(ValueError, match="x must be a float32 or bfloat16"):
        torch.ops.dsv2.rms_norm(x.half(), w, 1e-6)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        torch.ops.dsv2.rms_norm(x.t(), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match=r"weight must be .* \[8\]"):
        torch.ops.dsv2.rms_norm(x, torch.ones(7), 1e-6)
    y, rstd = torch.ops.dsv2.rms_norm(x, w, 1e-6)
    with pytest.raises(ValueError, match="dy must be"):
        torch.ops.dsv2.rms_norm_backward(y.bfloat16(), x, w, rstd)
    with pytest.raises(ValueError, match="rstd must be"):
        torch.ops.dsv2.rms_norm_backward(y, x, w, rstd[:3])
    xr, cos, sin = rope_inputs(torch.float32, R=8)
    with pytest.raises(ValueError, match="must be even"):
        torch.ops.dsv2.rope(xr[..., :7], cos, sin, False)
    with pytest.raises(ValueError, match="cos and sin must be"):
        torch.ops.dsv2.rope(xr, cos[:, :, :3], sin, False)
    with pytest.raises(ValueError, match="cos and sin must be"):
        torch.ops.dsv2.rope(xr, cos, sin.bfloat16(), False)
    yc, order, wc = combine_inputs(torch.float32, N=6, K=2, D=8)
    with pytest.raises(ValueError, match="is outside"):
        torch.ops.dsv2.moe_combine(yc, torch.where(order == 3, 12, order), wc)
    with pytest.raises(ValueError, match="repeats"):
        torch.ops.dsv2.moe_combine(yc, torch.cat([order[:1], order[:-1]]), wc)
    with pytest.raises(ValueError, match="order must be a contiguous int64"):
        torch.ops.dsv2.moe_combine(yc, order.int(), wc)
    with pytest.raises(ValueError, match="at most one row per copy"):
        torch.ops.dsv2.moe_combine(torch.cat([yc, yc[:1]]), torch.cat([order, order[:1]]), wc)
    with pytest.raises(ValueError, match="dout must be"):
        torch.ops.dsv2.moe_combine_backward(randn(5, 8), yc, order, wc)


# ------------------------------------------------------------------------ inside the model
def tiny_model(dtype=torch.float32, **overrides):
    cfg = dsv2.ModelConfig.from_preset("tiny", **{**dict(hidden_size=64, num_hidden_layers=3, q_lora_rank=32,
                                                         kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                                         v_head_dim=16, moe_intermediate_size=32,
                                                         max_position_embeddings=512), **overrides})
    torch.manual_seed(0)
    m = dsv2.DeepseekV2(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)   # norms too: a weight of ones hides dweight errors
    return m.to(dtype)


class DropHooks(MoEHooks):
    """Drops a fixed third of the copies in every MoE layer (as the trainer's capacity rule may)."""

    def keep(self, moe, route, shape):
        return torch.rand(route.idx_NK.shape, generator=torch.Generator().manual_seed(18)) > 0.33


def test_use_native_layers_swaps_and_is_idempotent():
    m = use_native_layers(use_native_layers(tiny_model()))
    norms = [x for x in m.modules() if isinstance(x, RMSNorm)]
    moes = [x for x in m.modules() if isinstance(x, MoE)]
    assert norms and all(type(x) is NativeRMSNorm for x in norms)
    assert moes and all(type(x.dispatcher) is NativeDispatcher for x in moes)
    assert set(m.state_dict()) == set(tiny_model().state_dict())


def test_a_training_step_through_the_model_matches_the_reference(monkeypatch):
    """Loss and every parameter's gradient, float32, with and without dropped copies, packed rows:
    native layers (and attention) against the model's PyTorch code; every native operator is called."""
    ref = tiny_model().train()
    ours = use_native_layers(use_native_attention(tiny_model().train()))
    calls = set()
    for name in ("rms_norm", "rms_norm_backward", "rope", "moe_combine", "moe_combine_backward"):
        real = getattr(torch.ops.dsv2, name)
        monkeypatch.setattr(torch.ops.dsv2, name, lambda *a, real=real, name=name: calls.add(name) or real(*a))
    g = torch.Generator().manual_seed(19)
    x = torch.randint(2, ref.config.vocab_size, (2, 40), generator=g)
    seg = torch.tensor([[0] * 25 + [1] * 15, [0] * 40])
    for kwargs in ({}, {"segment_ids": seg, "moe_hooks": DropHooks()}):
        losses = []
        for m in (ref, ours):
            m.zero_grad()
            loss = m(x, **kwargs).float().logsumexp(-1).mean()
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5
        for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
            if a.grad is not None:
                assert err(a.grad, b.grad) < 1e-5 * a.grad.abs().max().item() + 1e-7, name
    assert calls == {"rms_norm", "rms_norm_backward", "rope", "moe_combine", "moe_combine_backward"}


def test_a_bf16_autocast_training_step_is_no_further_from_float32_than_the_reference():
    """Under bfloat16 autocast (the trainer's precision on this CPU) norms see float32 and bfloat16
    inputs with float32 weights: loss and gradients against the float32 model, ours no further from
    it than the reference's own autocast step."""
    x = torch.randint(2, 4096, (2, 48), generator=torch.Generator().manual_seed(20))
    out = {}
    for key, native, autocast in (("truth", False, False), ("ref", False, True), ("ours", True, True)):
        m = tiny_model().train()
        if native:
            use_native_layers(use_native_attention(m))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = m(x).float().logsumexp(-1).mean()
        loss.backward()
        out[key] = (loss.detach(), [p.grad for p in m.parameters()])
    (t_loss, t_grads), (r_loss, r_grads), (o_loss, o_grads) = out["truth"], out["ref"], out["ours"]
    assert err(o_loss, t_loss) <= 1.5 * err(r_loss, t_loss) + 1e-3
    for t, r, o in zip(t_grads, r_grads, o_grads):
        if t is not None:
            assert err(o, t) <= 1.5 * err(r, t) + 1e-3 * t.abs().max().item()


def test_engine_prefill_matches_the_reference():
    """The engine's prefill with the native layers on or off (its attention native both times).
    float32: to rounding. bfloat16: both against the float32 model, ours no further from it."""
    m = tiny_model()
    prompts = [torch.randint(2, m.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (150, 40, 97)]
    truth = engine_prefill(m, False, prompts, SWITCH)
    ours = engine_prefill(m, True, prompts, SWITCH)
    assert all(type(x) is NativeRMSNorm for x in m.modules() if isinstance(x, RMSNorm))
    for x, y in zip(ours, truth):
        assert err(x, y) < 1e-4 * y.abs().max().item()
    m16 = tiny_model(torch.bfloat16)
    ours, theirs = engine_prefill(m16, True, prompts, SWITCH), engine_prefill(m16, False, prompts, SWITCH)
    for x, y, t in zip(ours, theirs, truth):
        assert err(x, t) <= 1.5 * err(y, t) + 1e-3


def test_decode_moe_keeps_its_fast_path_with_the_native_dispatcher_not_with_another(monkeypatch):
    m = prepare_for_decode(tiny_model())
    moe = next(x for x in m.modules() if isinstance(x, DecodeMoE))
    assert type(moe.dispatcher) is NativeDispatcher
    slow = []
    real = MoE.forward
    monkeypatch.setattr(MoE, "forward", lambda self, *a, **k: slow.append(1) or real(self, *a, **k))
    x = randn(1, 7, 64, seed=21)
    with torch.inference_mode():
        fast = moe(x)
        assert not slow
        moe.dispatcher = type("Other", (), {"dispatch": LocalDispatcher.dispatch, "combine": LocalDispatcher.combine})()
        other = moe(x)   # e.g. expert parallelism's dispatcher: the model's own path
        assert slow
    assert err(fast, other) < 1e-5


def test_the_trainer_uses_them_on_cpu(tmp_path):
    from dsv2.bench.common import random_shards
    from dsv2.train.config import load_config
    from dsv2.train.loop import Trainer
    data = random_shards(tmp_path, 512, 20_000)
    cfg = load_config("tiny", [f"data.dir={data}", f"out_dir={tmp_path / 'run'}", "export=false", "steps=1"])
    tr = Trainer(cfg, print_fn=lambda *_: None)
    assert all(type(x) is NativeRMSNorm for x in tr.model.modules() if isinstance(x, RMSNorm))
    assert all(type(x.dispatcher) is NativeDispatcher for x in tr.model.modules() if isinstance(x, MoE))


def test_rms_norm_weight_gradient_when_openmp_starts_fewer_threads_than_asked():
    """OpenMP may start fewer threads than torch asks for (OMP_THREAD_LIMIT, OMP_DYNAMIC on a busy
    machine, a call from another parallel region): every thread's partial sum of dweight is
    counted, and none is left holding stale memory. In a child process, since the limit is read at
    start-up; the allocator's free blocks are filled with 1e6 first, so an unset partial shows."""
    import os
    import subprocess
    import sys
    code = (
        "import torch\n"
        "from dsv2.native import build; build.load()\n"
        "torch.set_num_threads(2)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w, dy = torch.randn(256, 256, generator=g), torch.randn(256, generator=g), torch.randn(256, 256, generator=g)\n"
        "junk = torch.full((4, 256), 1e6); del junk\n"
        "y, rstd = torch.ops.dsv2.rms_norm(x, w, 1e-6)\n"
        "dx, dw = torch.ops.dsv2.rms_norm_backward(dy, x, w, rstd)\n"
        "want = (dy * x * rstd[:, None]).sum(0)\n"
        "print((dw - want).abs().max().item() / want.abs().max().item())\n")
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) < 1e-5, r.stdout
