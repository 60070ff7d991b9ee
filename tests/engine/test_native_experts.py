"""The routed experts' native operators (native/experts.py, experts.cpp): forward and backward
against the float64 formula and against the model's own per-expert loop, through a model's
training step and the engine's prefill, and their refusals of bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv2.engine.optimize import prepare_for_decode
from dsv2.model.moe import GroupedExperts, _SwiGLUExperts
from dsv2.native import build
from dsv2.native.attention import use_native_attention
from dsv2.native.layers import use_native_layers
from dsv2.native.experts import NativeGroupedExperts, routed
from dsv2.native.swap import use_native

from test_native import needs_cc
from test_native_attention import tiny_model

pytestmark = needs_cc


@pytest.fixture(scope="module", autouse=True)
def _built():
    build.load()

# (experts, D, I, rows per expert): odd widths (I not a multiple of the vector), experts without
# rows, one expert with most rows (run alone, across the threads) beside small ones, rows past the
# last expert's.
CASES = {
    "even": (4, 64, 32, [30, 17, 40, 9]),
    "odd_widths": (5, 40, 23, [7, 0, 12, 1, 5]),
    "one_large": (4, 48, 24, [700, 4, 6, 0]),
    "rows_past_the_last": (3, 32, 16, [5, 0, 4]),
}


def inputs(E, D, I, counts, dtype, extra_rows=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    M = sum(counts) + extra_rows
    x = torch.randn(M, D, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype)
    return x, w13, w2, torch.tensor(counts).cumsum(0)


def formula(x, w13, w2, ends):
    """y_r = W2_e (silu(W1_e x_r) * W3_e x_r) for each expert's rows, zero past the last; float64."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    start = 0
    for e, end in enumerate(ends.tolist()):
        gate, up = (x[start:end].double() @ w13[e].double().t()).chunk(2, dim=-1)
        y[start:end] = (F.silu(gate) * up) @ w2[e].double().t()
        start = end
    return y


def case(name, dtype, seed=0):
    E, D, I, counts = CASES[name]
    return inputs(E, D, I, counts, dtype, extra_rows=3 if name == "rows_past_the_last" else 0, seed=seed)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_and_gradients_equal_the_formula(name, dtype):
    """float32 within 1e-5 of float64 autograd through the formula; bfloat16 no further from it
    than the model's own per-expert loop in bfloat16 (which rounds as torch's ops do)."""
    x, w13, w2, ends = case(name, dtype)
    args = [t.clone().requires_grad_() for t in (x, w13, w2)]
    y, h = torch.ops.dsv2.experts_forward(*[a.detach() for a in args], ends, True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.ops.dsv2.experts_backward(dy, x, w13, w2, h, ends, True)
    ref = [a.detach().double().requires_grad_() for a in args]
    want_y = formula(*ref, ends)
    want = torch.autograd.grad(want_y, ref, dy.double())
    counts = torch.diff(ends, prepend=torch.zeros(1, dtype=ends.dtype)).tolist()
    if dtype == torch.bfloat16:   # the model's loop has no rows past the last expert's
        n = int(ends[-1])
        loop = [a.detach()[:n].clone().requires_grad_() if i == 0 else a.detach().clone().requires_grad_()
                for i, a in enumerate(args)]
        loop_y = _SwiGLUExperts.apply(*loop, tuple(counts))
        loop_g = torch.autograd.grad(loop_y, loop, dy[:n])
    for i, (got, w) in enumerate([(y, want_y), *zip(grads, want)]):
        assert got.dtype == dtype and got.shape == w.shape, i
        err = (got.double() - w).abs().max().item()
        scale = w.abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-5 * scale + 1e-6, (i, err, scale)
        else:
            theirs = loop_y if i == 0 else loop_g[i - 1]
            w_n = w[: theirs.shape[0]]
            their_err = (theirs.double() - w_n).abs().max().item()
            assert err <= 1.5 * their_err + 1e-3 * scale, (i, err, their_err)
    if name == "rows_past_the_last":   # no expert's rows: zero output, zero input gradient
        assert not y[-3:].any() and not grads[0][-3:].any()
    empty = [e for e, n in enumerate(counts) if n == 0]
    for e in empty:   # an expert without rows: zero weight gradients, whatever the buffer held
        assert not grads[1][e].any() and not grads[2][e].any()


def test_bfloat16_forward_rounds_as_the_models_loop():
    """Each elementwise step rounds to bfloat16 as torch's op does: the forward is the loop's,
    bit for bit (the products are the same oneDNN kernels, per expert)."""
    x, w13, w2, ends = case("even", torch.bfloat16, seed=3)
    counts = tuple(torch.diff(ends, prepend=torch.zeros(1, dtype=ends.dtype)).tolist())
    assert torch.equal(torch.ops.dsv2.experts_forward(x, w13, w2, ends, False)[0],
                       _SwiGLUExperts.apply(x, w13, w2, counts))


def test_one_thread_and_two_agree():
    x, w13, w2, ends = case("one_large", torch.float32, seed=2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.dsv2.experts_forward(x, w13, w2, ends, False)[0]
        torch.set_num_threads(2)
        two = torch.ops.dsv2.experts_forward(x, w13, w2, ends, False)[0]
    finally:
        torch.set_num_threads(threads)
    assert (one - two).abs().max() <= 1e-5 * one.abs().max()


def test_no_rows_at_all():
    x, w13, w2, _ = inputs(3, 16, 8, [0, 0, 0], torch.float32)
    ends = torch.zeros(3, dtype=torch.int64)
    y, h = torch.ops.dsv2.experts_forward(x, w13, w2, ends, True)
    assert y.shape == (0, 16) and h.shape == (0, 16)
    dx, g13, g2 = torch.ops.dsv2.experts_backward(y, x, w13, w2, h, ends, True)
    assert dx.shape == (0, 16) and not g13.any() and not g2.any()


def test_bad_inputs_are_refused_with_one_sentence():
    x, w13, w2, ends = case("even", torch.float32)
    with pytest.raises(ValueError, match="w13 and w2 must be float32 or bfloat16"):
        torch.ops.dsv2.experts_forward(x, w13.bfloat16(), w2, ends, False)
    with pytest.raises(ValueError, match="w13 and w2 must be float32 or bfloat16"):
        torch.ops.dsv2.experts_forward(x, w13.half(), w2.half(), ends, False)
    with pytest.raises(ValueError, match=r"w13 must be \[E, 2I, D\]"):
        torch.ops.dsv2.experts_forward(x, w13[:, :-1], w2, ends, False)
    with pytest.raises(ValueError, match="ends must rise"):
        torch.ops.dsv2.experts_forward(x, w13, w2, ends.flip(0), False)
    with pytest.raises(ValueError, match="ends must rise"):
        torch.ops.dsv2.experts_forward(x, w13, w2, ends + 1000, False)
    with pytest.raises(ValueError, match="int64"):
        torch.ops.dsv2.experts_forward(x, w13, w2, ends.int(), False)
    with pytest.raises(ValueError, match="x must be float32 or bfloat16"):
        torch.ops.dsv2.experts_forward(x.half(), w13, w2, ends, False)
    y, h = torch.ops.dsv2.experts_forward(x, w13, w2, ends, True)
    with pytest.raises(ValueError, match="kept"):
        torch.ops.dsv2.experts_backward(y, x, w13, w2, h[:, :-1], ends, True)


def test_the_operators_pass_opcheck():
    x, w13, w2, ends = case("odd_widths", torch.float32)
    for keep in (False, True):
        result = torch.library.opcheck(torch.ops.dsv2.experts_forward.default, (x, w13, w2, ends, keep))
        assert set(result.values()) == {"SUCCESS"}, result
    y, h = torch.ops.dsv2.experts_forward(x, w13, w2, ends, True)
    result = torch.library.opcheck(torch.ops.dsv2.experts_backward.default, (torch.randn_like(y), x, w13, w2, h, ends, True))
    assert set(result.values()) == {"SUCCESS"}, result


def test_a_training_step_through_the_model_matches_the_loop():
    """Loss and every parameter's gradient of a model whose experts are native against the same
    model's per-expert loop (both with the native attention and layers): float32, and bfloat16
    autocast (the trainer's CPU precision)."""
    ref = use_native_layers(use_native_attention(tiny_model().train()))
    ours = use_native(tiny_model().train())
    assert all(type(b.mlp.experts) is NativeGroupedExperts for b in ours.layers if hasattr(b.mlp, "experts"))
    assert any(hasattr(b.mlp, "experts") for b in ours.layers)
    x = torch.randint(2, ref.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(7))
    for autocast in (False, True):
        losses = []
        for m in (ref, ours):
            m.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = m(x[:, :-1], targets=x[:, 1:])
            loss.backward()
            losses.append(loss.item())
        tol = 5e-3 if autocast else 1e-5
        assert abs(losses[0] - losses[1]) <= tol * abs(losses[0])
        for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
            assert (a.grad - b.grad).abs().max() <= tol * b.grad.abs().max() + 1e-7, (autocast, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_takes_the_operator_and_matches_torch_grouped_matmul(dtype, monkeypatch):
    """The engine's MoE (DecodeMoE) calls the operator once per MoE layer, and its logits are those
    of the same model through torch's grouped matmul."""
    from dsv2.native import experts
    m = prepare_for_decode(tiny_model(dtype))
    x = torch.randint(2, m.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        with monkeypatch.context() as patch:
            patch.setattr(experts, "can_run", lambda *a: False)
            want = m(x)
        calls = []
        real = torch.ops.dsv2.experts_forward
        monkeypatch.setattr(torch.ops.dsv2, "experts_forward", lambda *a: calls.append(1) or real(*a))
        got = m(x)
    n_moe = sum(hasattr(b.mlp, "experts") for b in m.layers)
    assert len(calls) == n_moe > 0
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max()


def test_routed_rows_equal_the_model_experts():
    x, w13, w2, ends = case("one_large", torch.float32, seed=5)
    experts = GroupedExperts(4, 48, 24)
    with torch.no_grad():
        experts.gate_up_proj.copy_(w13)
        experts.down_proj.copy_(w2)
    counts = torch.diff(ends, prepend=torch.zeros(1, dtype=ends.dtype)).tolist()
    with torch.no_grad():
        want = experts(x, counts)
    assert (routed(x, w13, w2, ends) - want).abs().max() <= 1e-5 * want.abs().max()


def test_int8_experts_equal_the_int8_loop():
    """int8 rows (quant/int8.py) through experts_int8: the loop of int8 layers' products, expert by
    expert, which rounds each input row to int16 the same way; float32 and bfloat16 activations."""
    from dsv2.engine.optimize import routed_experts
    from dsv2.quant import int8
    x, w13, w2, ends = case("one_large", torch.float32, seed=6)
    q13, s13 = int8.quantize_rows(w13)
    q2, s2 = int8.quantize_rows(w2)
    start, want = 0, torch.zeros_like(x)
    for e, end in enumerate(ends.tolist()):
        if end > start:
            want[start:end] = int8.swiglu(x[start:end], q13[e], s13[e], q2[e], s2[e])
        start = end
    got = torch.ops.dsv2.experts_int8(x, q13, s13, q2, s2, ends)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert torch.equal(routed_experts(x, ends, q13, q2, s13, s2, []), got)
    with pytest.raises(ValueError, match="row scales"):
        torch.ops.dsv2.experts_int8(x, q13, s13[:, :-1], q2, s2, ends)
    with pytest.raises(ValueError, match="int8 q13"):
        torch.ops.dsv2.experts_int8(x, w13, s13, q2, s2, ends)


@pytest.mark.parametrize("name, x_dtype, w_dtype, seed", [
    ("one_large", torch.bfloat16, torch.float32, 8),   # autocast's float32 weights for bfloat16 rows
    ("odd_widths", torch.float32, torch.bfloat16, 10),   # a bfloat16 model's prefill in float32 (I = 23)
], ids=["autocast", "bf16_model_prefilled_in_fp32"])
def test_weights_of_the_other_dtype_are_converted_per_expert(name, x_dtype, w_dtype, seed):
    """Weights in the other float dtype go in as they are: the same numbers as converting the
    stacks to x's dtype first, and weight gradients in the weights' dtype that are the converted
    run's, converted back (under autocast: what its cast gives autograd)."""
    x, w13, w2, ends = case(name, torch.float32, seed=seed)
    x, w13, w2 = x.to(x_dtype), w13.to(w_dtype), w2.to(w_dtype)
    y, h = torch.ops.dsv2.experts_forward(x, w13, w2, ends, True)
    yc, hc = torch.ops.dsv2.experts_forward(x, w13.to(x_dtype), w2.to(x_dtype), ends, True)
    assert torch.equal(y, yc) and torch.equal(h, hc)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(x_dtype)
    got = torch.ops.dsv2.experts_backward(dy, x, w13, w2, h, ends, True)
    want = torch.ops.dsv2.experts_backward(dy, x, w13.to(x_dtype), w2.to(x_dtype), h, ends, True)
    assert [g.dtype for g in got] == [x_dtype, w_dtype, w_dtype]
    for g, w in zip(got, want):
        assert torch.equal(g, w.to(g.dtype))


def test_the_input_gradient_is_skipped_when_not_needed():
    x, w13, w2, ends = case("even", torch.float32, seed=12)
    y, h = torch.ops.dsv2.experts_forward(x, w13, w2, ends, True)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(13))
    with_dx = torch.ops.dsv2.experts_backward(dy, x, w13, w2, h, ends, True)
    dx, g13, g2 = torch.ops.dsv2.experts_backward(dy, x, w13, w2, h, ends, False)
    assert dx.numel() == 0 and torch.equal(g13, with_dx[1]) and torch.equal(g2, with_dx[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_gates_give_silus_limits(dtype):
    """silu(g) -> 0 as g -> -inf (exp_neg stops at e^-87: past it the gate's factor is 0, not
    e^-87, which times -1e30 gave -1.6e-8) and -> g as g -> +inf (one expert, one row)."""
    gates = torch.tensor([-3e38, -1e30, -100.0, -5.0, 50.0, 1e30])
    I = gates.numel()
    x = torch.ones(1, I)
    w13 = torch.cat([torch.diag(gates), torch.eye(I)])[None]   # gate_j = g_j, up_j = 1
    w2 = torch.eye(I)[None]
    y = torch.ops.dsv2.experts_forward(x.to(dtype), w13.to(dtype), w2.to(dtype), torch.tensor([1]), False)[0]
    want = torch.nn.functional.silu(gates.to(dtype).float())
    assert torch.allclose(y[0].float(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-30), (y, want)
