"""The fused decode step (native, the torch.ops.dsv2.decode_step operator) against the PyTorch
absorbed decode step: same inputs, same cache, logits within 1e-4 (float32), across the model
variants and every dtype it reads; its checks, fallbacks and torch.compile composition."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dsv2
from dsv2.engine import Engine, Request, SamplingParams
from dsv2.engine.cache import LatentCache
from dsv2.engine.decode import DecodeStep
from dsv2.native import NativeDecoder, build
from dsv2.quant.int8 import integer_products, quantize_int8

import _tiny

# On a machine with no C++ compiler or no ninja these cannot run (the engine then decodes with
# PyTorch ops: test_without_a_compiler_decoding_falls_back_with_one_notice). A compiler that fails
# to build the operator is a failure, not a skip.
HAVE_CC = bool(build.compiler() and shutil.which("ninja"))
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C++ compiler or ninja here to build the fused decode step")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
VARIANTS = {
    "v2": {},                                                        # grouped routing, query compression
    "lite": dict(q_lora_rank=None, topk_method="greedy", n_group=None, topk_group=None),
    "yarn": dict(rope_scaling=YARN),
    "norm_topk": dict(norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=2),
    "no_shared": dict(n_shared_experts=0, first_k_dense_replace=0),
    # widths that are no multiple of the 8-float vectors: every tail loop runs
    "odd": dict(hidden_size=60, q_lora_rank=28, kv_lora_rank=20, qk_nope_head_dim=10, qk_rope_head_dim=6,
                v_head_dim=12, moe_intermediate_size=20, intermediate_size=44, num_attention_heads=3),
}


def model(**overrides):
    return _tiny.random_model(**{"num_hidden_layers": 3, "moe_intermediate_size": 32, **overrides})


def filled_caches(cfg, slots, dtype, seed=0, max_len=40):
    """Two caches with the same random contents (as if earlier tokens had been written)."""
    a, b = LatentCache(cfg, slots, max_len, dtype), LatentCache(cfg, slots, max_len, dtype)
    g = torch.Generator().manual_seed(seed)
    for x, y in zip(a.joint, b.joint):
        r = torch.randn(x.shape, generator=g).to(dtype)
        x.copy_(r)
        y.copy_(r)
    return a, b


def both_steps(m, ref_model, pos, dtype=torch.float32, seed=0):
    """(fused logits, PyTorch logits, fused cache, PyTorch cache) after one step at positions pos."""
    B = len(pos)
    ours, theirs = filled_caches(m.config, B, dtype, seed)
    tokens = torch.randint(2, m.config.vocab_size, (B, 1), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        got = NativeDecoder(m)(tokens, pos, max(pos) + 1, ours)
        want = DecodeStep(ref_model, native=False)(tokens, pos, max(pos) + 1, theirs, B)
    return got, want, ours, theirs


@needs_cc
@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_step_equals_pytorch_step(variant):
    """Ragged positions (each slot attends to its own prefix) at batch 1, 2 and 7 (the 3 x 4 tiles and
    their remainders): logits within 1e-4, and the same latents written to the cache."""
    m = model(**VARIANTS[variant])
    for pos in ([9], [4, 30], [5, 17, 11, 0, 23, 8, 38]):
        got, want, ours, theirs = both_steps(m, m, pos)
        assert got.shape == want.shape == (len(pos), m.config.vocab_size)
        assert (got - want).abs().max().item() < 1e-4, pos
        assert got.std() > 0.1  # not trivially small
        for x, y in zip(ours.joint, theirs.joint):
            assert (x - y).abs().max().item() < 1e-5


def encoded_caches(cfg, slots, max_len, kv, seed):
    """Two caches of the quantized format kv with the same random rows, encoded as the engine would."""
    a, b = (LatentCache(cfg, slots, max_len, torch.float32, kv_cache_dtype=kv) for _ in range(2))
    g = torch.Generator().manual_seed(seed)
    for i, (x, y) in enumerate(zip(a.joint, b.joint)):
        rows = torch.randn(slots, max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim, generator=g)
        enc = a.fmt.encode(rows, a.scales[i] if a.scales is not None else None)
        x.copy_(enc)
        y.copy_(enc)
    return a, b


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# Attention over hundreds of cached positions: blocks of 64 positions shared out across the
# threads, a token's blocks split between threads and merged by their running max and sum.
LONG = ([299], [130, 5, 257, 64, 63, 200])
HEADS9 = dict(num_attention_heads=9, hidden_size=72)
LONG_CASES = [(v, kv) for v in ("v2", "odd", "heads9") for kv in (None, "int8", "fp8", "mixed")
              if not (v == "odd" and kv == "mixed")]   # the mixed format's 4-bit groups need C % 32 == 0


@needs_cc
@pytest.mark.parametrize("variant,kv", LONG_CASES)
def test_attention_over_many_blocks_on_any_number_of_threads(variant, kv):
    """Positions up to 299 at batch 1 and a ragged batch of 6, on 1, 2 and 3 threads: the same logits
    as the PyTorch step within 1e-4, for a float32 cache and each quantized format (both read the
    same stored rows). heads9 runs the 8-head and single-head tiles; odd every ragged tail."""
    overrides = {**VARIANTS.get(variant, {}), **(HEADS9 if variant == "heads9" else {})}
    m = model(**overrides)
    for pos in LONG:
        B, seed = len(pos), len(pos)
        tokens = torch.randint(2, m.config.vocab_size, (B, 1), generator=torch.Generator().manual_seed(seed))
        for n in (1, 2, 3):
            if kv is None:
                ours, theirs = filled_caches(m.config, B, torch.float32, seed, max_len=320)
            else:
                ours, theirs = encoded_caches(m.config, B, 320, kv, seed)
            with threads(n), torch.inference_mode():
                got = NativeDecoder(m)(tokens, pos, max(pos) + 1, ours)
                want = DecodeStep(m, native=False)(tokens, pos, max(pos) + 1, theirs, B)
            assert (got - want).abs().max().item() < 1e-4, (pos, n)
            if kv is None:   # the new latents written alike (quantized rows are covered in test_kv_cache_formats)
                assert all((x - y).abs().max().item() < 1e-5 for x, y in zip(ours.joint, theirs.joint))


@needs_cc
@pytest.mark.parametrize("heads", [4, 9])
def test_bfloat16_attention_over_many_blocks(heads):
    """A bfloat16 model over a bfloat16 cache of hundreds of positions, on 1 and 3 threads, against
    the float32 computation over the same rounded weights and rows. Where the CPU has AVX512-BF16
    the fused step multiplies bfloat16 pairs (the attention's query and probabilities, and a batch's
    matmul inputs, rounded to bfloat16, as PyTorch's bfloat16 kernels round them): within 1.5x of
    PyTorch's bfloat16 step's error. At batch 1 the weight reads keep float32 inputs: no further
    off than PyTorch's step."""
    m, ref = bf16_pair(**(HEADS9 if heads == 9 else {}))
    for pos, slack in (([299, 130, 5, 257], 1.5), ([299], 1.0)):
        B = len(pos)
        tokens = torch.randint(2, m.config.vocab_size, (B, 1), generator=torch.Generator().manual_seed(heads))
        for n in (1, 3):
            ours, theirs = filled_caches(m.config, B, torch.bfloat16, seed=heads, max_len=320)
            exact = float32_copy(m.config, ours)
            with threads(n), torch.inference_mode():
                fused = NativeDecoder(m)(tokens, pos, 300, ours)
                eager = DecodeStep(m, native=False)(tokens, pos, 300, theirs, B)
                want = DecodeStep(ref, native=False)(tokens, pos, 300, exact, B)
            err_fused, err_eager = (fused - want).abs().max().item(), (eager.float() - want).abs().max().item()
            assert err_fused < 0.08 * want.std().item(), (B, n, err_fused)
            assert err_fused <= slack * err_eager + 1e-3, (B, n, err_fused, err_eager)


def widened(q):
    """A float32 model computing exactly with q's int8 weights (rows times their scales)."""
    f = dsv2.DeepseekV2(q.config).eval()
    state = {}
    for name, t in q.state_dict().items():
        if name.endswith(".qweight"):
            state[name.replace(".qweight", ".weight")] = t.float() * q.state_dict()[name[:-7] + "scale"].float()[:, None]
        elif name.endswith("_q"):
            state[name[:-2]] = t.float() * q.state_dict()[name[:-1] + "s"].float()[..., None]
        elif not name.endswith((".scale", "_s")):
            state[name] = t
    f.load_state_dict(state)
    return f


@needs_cc
def test_fused_step_reads_int8_weights_and_rounds_inputs_to_int16():
    """With quantize_int8 the fused step reads the int8 rows and scales, and multiplies them by its
    inputs rounded to int16 (one scale per input row): its logits equal the float32 model built from
    the same rounded weights up to that rounding, which moves them by under 2% of what rounding the
    weights to int8 moves them (measured ~0.5%); inputs rounded to int8 would move them ~100x more
    and fail. PyTorch's int8 layers (torch.ops.dsv2.int8_mm) round the same way: as close to it."""
    for variant in ("v2", "odd"):   # odd: rows whose widths leave a tail after the 32-wide loops
        base = model(**VARIANTS[variant])
        q = quantize_int8(model(**VARIANTS[variant]))
        for pos, n in (([9], 2), ([5, 17, 11, 0, 23], 1), ([5, 17, 11, 0, 23], 3)):   # row dot products, tiles
            with threads(n):   # 1 thread: no barrier waits, each still forgets the int16 inputs
                got, want, _, _ = both_steps(q, widened(q), pos)
            _, float32, _, _ = both_steps(q, base, pos)
            _, pytorch, _, _ = both_steps(q, q, pos)   # PyTorch's int8 step
            err, weights = (got - want).abs().max().item(), (float32 - want).abs().max().item()
            assert err < 0.02 * weights, (variant, pos, err, weights)
            if integer_products():   # PyTorch's int8 layers: the same int16 inputs and integer products
                assert (got - pytorch).abs().max().item() < 0.02 * weights, (variant, pos)


@needs_cc
def test_int8_rows_wider_than_8256_keep_every_int32_lane_exact():
    """Past 8,256 columns the inputs are rounded to fewer int16 levels, so that no int32 lane of the
    integer products can overflow even in the worst case, built here: a 9,000-wide down projection
    whose int8 rows are all 127 against inputs that are all alike (every gate row and every up row
    the same, so silu(gate) * up is one value repeated). With the full 32,767 levels a lane would
    pass 2^31 and the logits would be garbage."""
    m = model(intermediate_size=9000)
    mlp = m.layers[0].mlp   # the dense first layer
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[:1].expand_as(mlp.gate_proj.weight))
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[:1].expand_as(mlp.up_proj.weight))
        mlp.down_proj.weight.fill_(0.01)
    q = quantize_int8(m)
    assert (q.layers[0].mlp.down_proj.qweight == 127).all()
    for pos in ([9], [5, 17, 11, 0, 23]):
        got, want, _, _ = both_steps(q, widened(q), pos)
        assert (got - want).abs().max().item() < 1e-3 * want.std().item(), pos


def bf16_pair(**overrides):
    """A bfloat16 model and the float32 model of exactly its rounded weights."""
    m = model(**overrides).bfloat16()
    ref = model(**overrides)
    ref.load_state_dict({k: v.float() for k, v in m.state_dict().items()})
    return m, ref


def float32_copy(cfg, cache: LatentCache) -> LatentCache:
    """The same cache contents, widened to float32."""
    out = LatentCache(cfg, cache.slots, cache.max_len, torch.float32)
    for j, c in zip(out.joint, cache.joint):
        j.copy_(c.float())
    return out


@needs_cc
def test_fused_step_in_bfloat16_is_at_least_as_accurate_as_pytorch():
    """bfloat16 weights and cache, a batch of 5 (its matmuls multiply bfloat16 pairs where the CPU
    can): no further from the float32 computation with the same rounded weights than PyTorch's
    bfloat16 step, which rounds every activation."""
    m, ref = bf16_pair()
    pos = [5, 17, 11, 0, 23]
    tokens = torch.randint(2, m.config.vocab_size, (5, 1), generator=torch.Generator().manual_seed(3))
    caches = filled_caches(m.config, 5, torch.bfloat16, seed=3)
    exact = float32_copy(m.config, caches[0])
    with torch.inference_mode():
        fused = NativeDecoder(m)(tokens, pos, 24, caches[0])
        eager = DecodeStep(m, native=False)(tokens, pos, 24, caches[1], 5)
        want = DecodeStep(ref, native=False)(tokens, pos, 24, exact, 5)
    err_fused, err_eager = (fused - want).abs().max().item(), (eager.float() - want).abs().max().item()
    assert err_fused < 0.05 * want.std().item()
    assert err_fused <= err_eager + 1e-3, (err_fused, err_eager)


@needs_cc
def test_bfloat16_rows_wider_than_every_activation_fit_the_scratch():
    """bfloat16 rows are widened four at a time into per-thread scratch sized by the widest matrix:
    W^UK^T rows (the nope width) wider than everything else must count too."""
    kw = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=1, qk_nope_head_dim=128, qk_rope_head_dim=8,
              v_head_dim=8, kv_lora_rank=16, q_lora_rank=None, intermediate_size=32, moe_intermediate_size=16)
    m, ref = bf16_pair(**kw)
    pos = [3, 5, 7, 9]
    tokens = torch.randint(2, m.config.vocab_size, (4, 1), generator=torch.Generator().manual_seed(5))
    ours, _ = filled_caches(m.config, 4, torch.bfloat16, seed=5)
    exact = float32_copy(m.config, ours)
    with torch.inference_mode():
        got = NativeDecoder(m)(tokens, pos, 10, ours)
        want = DecodeStep(ref, native=False)(tokens, pos, 10, exact, 4)
    assert (got - want).abs().max().item() < 0.05 * want.std().item()


@needs_cc
def test_engine_generates_the_same_tokens_either_way():
    """A ragged batch whose requests finish at different steps: identical greedy tokens with the fused
    step and with PyTorch ops."""
    m = model()
    runs = []
    for native in (True, False):
        eng = Engine(m, max_batch_slots=4, max_len=64, native=native)
        assert (eng._decode.native is not None) == native
        for i, n in enumerate([3, 11, 26, 7]):
            eng.add(Request(list(range(2, 2 + n)), SamplingParams(max_new_tokens=4 + 5 * i, ignore_eos=True)))
        toks = {}
        while eng.active:
            for o in eng.step():
                toks.setdefault(o.request_id, []).append(o.token_id)
        runs.append(toks)
    assert runs[0] == runs[1] and [len(t) for t in runs[0].values()] == [4, 9, 14, 19]


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_changed_in_place_after_the_engine_was_built_are_used(dtype):
    """As an optimizer step changes them: shared tensors and the copies the decoder keeps
    (W^UK transposed from kv_b_proj; in bfloat16 the router and norms widened) alike."""
    m = model().to(dtype)
    dec = NativeDecoder(m)
    tokens = torch.tensor([[5], [9]])
    with torch.no_grad():
        m.lm_head.weight.mul_(-1.0)
        m.layers[1].mlp.gate.weight.copy_(torch.randn_like(m.layers[1].mlp.gate.weight))
        m.layers[0].self_attn.kv_b_proj.weight.mul_(2.0)
        m.layers[2].post_attention_layernorm.weight.add_(0.5)
    ours, theirs = filled_caches(m.config, 2, dtype)
    with torch.inference_mode():
        got = dec(tokens, [3, 7], 8, ours)
        want = DecodeStep(m.float(), native=False)(tokens, [3, 7], 8, filled_caches(m.config, 2, torch.float32)[1], 2)
        if dtype == torch.float32:
            assert (got - want).abs().max().item() < 1e-4
        else:  # the same weights in bfloat16 against float32 arithmetic over them
            assert (got - want).abs().max().item() < 0.05 * want.std().item()


@needs_cc
def test_an_engine_whose_model_stops_fitting_falls_back_mid_generation(capsys):
    """Weights changed in place while the model was put in training mode: the decoder's re-read
    refuses it, and the engine goes on with PyTorch ops after one notice."""
    m = model()
    eng = Engine(m, max_batch_slots=1, max_len=32)
    eng.add(Request([2, 3, 4], SamplingParams(max_new_tokens=6, ignore_eos=True)))
    eng.step(), eng.step()
    m.train()
    with torch.no_grad():
        m.layers[0].self_attn.kv_b_proj.weight.mul_(1.0)
    n = 0
    while eng.active:
        n += len(eng.step())
    assert n == 4 and eng._decode.native is None
    assert capsys.readouterr().err.count("fused CPU decode step stopped") == 1


@needs_cc
def test_bad_tokens_positions_and_caches_are_refused():
    m = model()
    dec, cache = NativeDecoder(m), LatentCache(m.config, 2, 16, torch.float32)
    with pytest.raises(ValueError, match="token ids must be in"):
        dec(torch.tensor([[3], [m.config.vocab_size]]), [1, 2], 3, cache)
    with pytest.raises(ValueError, match="do not fit a cache"):
        dec(torch.tensor([[3], [4]]), [1, 16], 17, cache)
    with pytest.raises(ValueError, match="one token per decoding slot"):
        dec(torch.tensor([[3]]), [1, 2], 3, cache)
    other = _tiny.random_model(num_hidden_layers=1).config   # a cache made for another model
    with pytest.raises(ValueError, match="does not fit the model"):
        dec(torch.tensor([[3], [4]]), [1, 2], 3, LatentCache(other, 2, 16, torch.float32))
    with torch.inference_mode():   # int32 ids are read as what they are
        a = dec(torch.tensor([[3], [4]], dtype=torch.int32), [1, 2], 3, cache)
        b = dec(torch.tensor([[3], [4]]), [1, 2], 3, cache)
    assert torch.equal(a, b)


def test_without_a_compiler_decoding_falls_back_with_one_notice(tmp_path):
    code = ("import torch, _tiny; from dsv2.engine import Engine, Request, SamplingParams\n"
            "m = _tiny.random_model()\n"
            "for _ in range(2):\n"
            "    e = Engine(m, max_batch_slots=1, max_len=16)\n"
            "    assert e._decode.native is None\n"
            "    e.add(Request([2, 3], SamplingParams(max_new_tokens=3, ignore_eos=True)))\n"
            "    assert len([o for _ in range(3) for o in e.step()]) == 3\n"
            "try:\n"
            "    Engine(m, max_batch_slots=1, max_len=16, native=True)\n"
            "except ValueError as err:\n"
            "    print('ERR', err)\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-cc"), DSV2_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if "fused CPU decode step unavailable" in line]
    assert len(notices) == 1 and "no-such-cc" in notices[0]
    assert r.stdout.startswith("ERR the fused decode step is unavailable:")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.so"))
    # A cache folder that cannot be made: the same notice, the same fallback.
    env = dict(env, DSV2_CACHE_DIR="/dev/null/dsv2")
    env.pop("CXX")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if "fused CPU decode step unavailable" in line]
    # A compiler that answers torch's version queries but fails every build: tried once, same fallback.
    fails = tmp_path / "failing-c++"
    fails.write_text("#!/bin/sh\ncase \"$*\" in *.cpp*|*-shared*) echo 'x.cpp:1: error: this compiler refuses "
                     "everything' >&2; exit 1;; esac\nexec %s \"$@\"\n" % build.compiler())
    fails.chmod(0o755)
    env = dict(env, CXX=str(fails), DSV2_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    notices = [line for line in r.stderr.splitlines() if "fused CPU decode step unavailable" in line]
    assert len(notices) == 1 and "could not build" in notices[0] and "refuses everything" in notices[0]
    assert r.stderr.count("building the fused CPU decode step") == 1
    assert not list((tmp_path / "cache").rglob("*.so"))  # no half-built library left to load


def _builds_for(march: str) -> bool:
    """This machine runs x86 code of that level and the compiler takes -march=march."""
    flags = build._cpu_flags().split()
    if not HAVE_CC or "avx2" not in flags or "fma" not in flags:
        return False
    r = subprocess.run([build.compiler(), f"-march={march}", "-x", "c++", "-E", "-"], input="", capture_output=True,
                       text=True, timeout=60)
    return r.returncode == 0


@pytest.mark.skipif(not _builds_for("x86-64-v3"), reason="needs an x86 CPU with AVX2 and a compiler that takes "
                                                           "-march=x86-64-v3")
def test_the_avx2_kernels_on_this_cpu():
    """The step built for x86-64-v3 (AVX2, no AVX-512), as an AVX2-only CPU gets it, on this CPU:
    its 8-wide tiles and attention, the int8 x int16 products by VPMADDWD, the prefill
    attention's 6-row float32 tiles (bfloat16 widened, test_native_attention.py), the experts'
    8-wide SwiGLU (test_native_experts.py) and the layers' 8-wide rows with their generic bfloat16
    conversions (test_native_layers.py). On an AVX-512
    machine nothing else runs them, so the equality tests run again in a child process with
    DSV2_NATIVE_MARCH=x86-64-v3 (its own build, cached beside the native one)."""
    env = dict(os.environ, DSV2_NATIVE_MARCH="x86-64-v3")
    tests = os.path.dirname(__file__)
    files = [os.path.join(tests, f) for f in ("test_native.py", "test_engine_int8.py", "test_native_attention.py",
                                              "test_native_experts.py", "test_native_layers.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        "-k", "equals_pytorch_step or int16 or 8256 or many_blocks or slots_it_is_given or "
                              "int8_matmul or at_least_as_accurate or the_formula or matches_sdpa or "
                              "rounds_as_the_models_loop or int8_experts or extreme_gates"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-500:]


def test_switched_off_by_environment_or_argument(monkeypatch):
    m = model()
    assert Engine(m, max_batch_slots=1, max_len=16, native=False)._decode.native is None
    monkeypatch.setenv("DSV2_NATIVE", "0")
    assert Engine(m, max_batch_slots=1, max_len=16)._decode.native is None


@needs_cc
def test_fused_step_decodes_the_slots_it_is_given():
    """Three tokens into slots 1, 4 and 6 of a 7-slot cache: their logits equal the PyTorch step's
    rows for those slots (it runs all 7), their latents land at their own positions, and nothing
    else in the cache changes. Repeated or missing slots are refused."""
    m = model()
    ours, theirs = filled_caches(m.config, 7, torch.float32, seed=5)
    before = [c.clone() for c in ours.joint]
    pos, pick = [9, 3, 12, 5, 7, 2, 11], [1, 4, 6]
    tokens = torch.randint(2, m.config.vocab_size, (7, 1), generator=torch.Generator().manual_seed(5))
    dec = NativeDecoder(m)
    with torch.inference_mode():
        got = dec(tokens[pick], [pos[s] for s in pick], max(pos) + 1, ours, slots=pick)
        want = DecodeStep(m, native=False)(tokens, pos, max(pos) + 1, theirs, 7)[pick]
    assert (got - want).abs().max().item() < 1e-4
    for x, y, b in zip(ours.joint, theirs.joint, before):
        for s in range(7):
            if s in pick:
                assert (x[s, pos[s]] - y[s, pos[s]]).abs().max() < 1e-4     # its new latent
                x[s, pos[s]] = b[s, pos[s]]
            assert torch.equal(x[s], b[s]), s                              # and nothing else
    for slots in ([4, 4], [7, 0]):   # two tokens for one slot; no slot 7
        with pytest.raises(ValueError, match="must be distinct slots of a cache of 7"):
            dec(tokens[:2], [3, 4], 13, ours, slots=slots)


@needs_cc
def test_engine_decodes_a_lone_request_in_a_high_slot_as_one_row():
    """A request that reuses a cached prefix in slot 5 runs one-row steps (before, every slot below
    it was decoded too: a lone request in slot 39 of 64 took 6x as long a token), and decodes
    exactly the tokens it would in slot 0."""
    m = model()
    prompts = [[2 + i, 40, 41, 42, 43] for i in range(6)]
    eng = Engine(m, max_batch_slots=8, max_len=64)
    eng.add_many([Request(p, SamplingParams(max_new_tokens=2, ignore_eos=True)) for p in prompts])
    while eng.active:
        eng.step()
    rows, native = [], eng._decode.native
    eng._decode.native = lambda tokens, positions, *a, **kw: rows.append(len(positions)) or native(tokens, positions, *a, **kw)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert eng.add(Request(prompts[5] + [7, 8], params)) == 5   # the slot holding its prefix
    high = [o.token_id for _ in range(6) for o in eng.step()]
    fresh = Engine(m, max_batch_slots=8, max_len=64)
    assert fresh.add(Request(prompts[5] + [7, 8], params)) == 0
    low = [o.token_id for _ in range(6) for o in fresh.step()]
    assert rows == [1] * 5 and high == low


@needs_cc
def test_work_space_is_what_the_step_asks_for():
    """The C side carves its buffers from one block whose size it reports: a batch that reaches every
    expert (the most work items) writes nothing past that size."""
    m = model(n_routed_experts=8, num_experts_per_tok=4)
    dec = NativeDecoder(m)
    cache = LatentCache(m.config, 16, 40, torch.float32)
    pos = list(range(3, 35, 2))
    need = dec.work_floats(16)
    dec._work = torch.full((need + 4096,), 7.0)
    dec._sized = (16, torch.get_num_threads())
    with torch.inference_mode():
        dec(torch.arange(2, 18)[:, None], pos, max(pos) + 1, cache)
    assert (dec._work[:need] != 7.0).any() and (dec._work[need:] == 7.0).all()


def op_args(dec, cache, tokens=(3, 4), positions=(5, 7), kv_len=8):
    dec._work = torch.zeros(dec.work_floats(len(positions)))
    fmt = cache.fmt.code if cache.fmt is not None else {torch.float32: 0, torch.bfloat16: 1}[cache.dtype]
    return (dec.weights, dec.ints, dec.floats, torch.tensor(tokens), torch.tensor(positions), kv_len, cache.joint,
            fmt, cache.scales, dec._work)


@needs_cc
def test_the_operator_passes_opcheck_and_compiles_in_one_graph():
    """torch.library.opcheck: the schema declares exactly what the op mutates (the cache and work
    space), and the fake kernel's shapes match the real ones. torch.compile(fullgraph=True) traces
    through it: the same logits and the same cache writes as the eager call."""
    m = model(num_hidden_layers=2)
    dec = NativeDecoder(m)
    ours, theirs = filled_caches(m.config, 2, torch.float32)
    result = torch.library.opcheck(torch.ops.dsv2.decode_step.default, op_args(dec, ours))
    assert set(result.values()) == {"SUCCESS"}, result

    def step(tokens, positions, joint, work):
        logits = torch.ops.dsv2.decode_step(dec.weights, dec.ints, dec.floats, tokens, positions, 8, joint, 0, None, work)
        return logits.log_softmax(-1)

    ours, theirs = filled_caches(m.config, 2, torch.float32, seed=1)
    with torch.no_grad():
        got = torch.compile(step, fullgraph=True)(*op_args(dec, ours)[3:5], ours.joint, dec._work)
        want = step(*op_args(dec, theirs)[3:5], theirs.joint, dec._work)
    assert (got - want).abs().max().item() < 1e-5
    for x, y in zip(ours.joint, theirs.joint):
        assert torch.equal(x, y)


@needs_cc
def test_tensors_that_do_not_fit_the_config_are_refused_by_name():
    """Called directly, the operator checks every tensor against the config numbers: one sentence
    naming the tensor, never a crash or a wild read."""
    m = model(num_hidden_layers=2)
    dec = NativeDecoder(m)
    cache = LatentCache(m.config, 2, 16, torch.float32)
    glob, slots, _, _ = torch.ops.dsv2.layout()
    q_a = len(glob) + slots.index("q_a")

    def refusal(weights=None, work=None):
        args = list(op_args(dec, cache))
        args[0] = dec.weights if weights is None else weights
        args[-1] = args[-1] if work is None else work
        with pytest.raises(ValueError) as e:
            torch.ops.dsv2.decode_step(*args)
        msg = str(e.value)
        assert "\n" not in msg and msg.endswith(".")
        return msg

    def swap(i, t):
        return dec.weights[:i] + [t] + dec.weights[i + 1:]

    w = dec.weights[q_a]
    assert "layers.0.q_a has shape" in refusal(swap(q_a, w[:, :-1]))
    assert "layers.0.q_a has shape" in refusal(swap(q_a, w.t()))
    assert "embed is Half" in refusal(swap(glob.index("embed"), dec.weights[glob.index("embed")].half()))
    assert "int8 layers.0.q_a needs" in refusal(swap(q_a, w.to(torch.int8)))
    assert "weight slots for 2 layers" in refusal(dec.weights[:-1])
    assert "work space" in refusal(work=torch.empty(10))
