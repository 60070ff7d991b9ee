"""Block-scaled FP8 weights: DeepSeek's checkpoint format in and out, and computing with it
(prefill by per-layer widening here; decode in the fused CPU step in engine/test_engine_fp8.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dsv2
from dsv2.checkpoint import CheckpointError, load_pretrained, save_pretrained
from dsv2.cli import main
from dsv2.quant.fp8 import FP8, FP8_WEIGHTS, Fp8GroupedExperts, Fp8Linear, dequantize_blocks, quantize_blocks

from hf_models import make_hf_model

# Sides over 128 and not multiples of it: the dense FFN is [272, 192] (3 x 2 blocks, both edges partial).
SHAPES = dict(hidden_size=192, intermediate_size=272, moe_intermediate_size=48, vocab_size=160)


def expand(s: torch.Tensor, shape, block) -> torch.Tensor:
    """Scales [.., nbr, nbk] -> one per element, by Kronecker product (independent of the library's)."""
    ones = torch.ones(block)
    return torch.kron(s, ones)[..., : shape[-2], : shape[-1]]


def test_blocks_round_each_weight_to_e4m3_of_its_block():
    w = torch.randn(200, 300) * torch.logspace(-3, 1, 200)[:, None]
    q, s = quantize_blocks(w)
    assert q.dtype == FP8 and q.shape == w.shape and s.shape == (2, 3)
    back = q.float() * expand(s, w.shape, (128, 128))
    assert torch.equal(back, dequantize_blocks(q, s))
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value; below 2^-6 steps are 2^-9 x scale
    err = (back - w).abs()
    assert (err <= w.abs() / 16 + expand(s, w.shape, (128, 128)) * 2**-10 + 1e-12).all()
    # every block's largest weight lands on 448 (the scale is its amax / 448)
    assert q.float().abs().amax() == 448


def fp8_checkpoint(src, dst, block=(128, 128), seed=0):
    """A hand-made FP8 checkpoint: each FP8_WEIGHTS matrix of src replaced by random e4m3 codes and
    random block scales (known values). -> {HF key: (codes, scales)}."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(src / "model.safetensors")
    known = {}
    for key in list(state):
        name = key.removeprefix("model.")
        is_expert = ".mlp.experts." in name
        if not (FP8_WEIGHTS.match(name) or (is_expert and name.endswith("_proj.weight"))):
            continue
        w = state[key]
        codes = (torch.randn(w.shape, generator=g) * 100).clamp(-448, 448).to(FP8)
        nb = (-(-w.shape[0] // block[0]), -(-w.shape[1] // block[1]))
        scales = 2.0 ** torch.randint(-12, -4, nb, generator=g).float() * (1 + torch.rand(nb, generator=g))
        state[key], state[f"{key}_scale_inv"] = codes, scales
        known[key] = (codes, scales)
    dst.mkdir()
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return known


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    make_hf_model(**SHAPES).save_pretrained(root / "src")
    known = fp8_checkpoint(root / "src", root / "fp8")
    return root / "fp8", known


def hf_to_param(model, key):
    from dsv2.checkpoint import _target_view, hf_to_dsv2
    name, part, e = hf_to_dsv2(key)
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    return _target_view(params[name], part, e)


def test_handmade_fp8_checkpoint_loads_to_exactly_its_dequantized_weights(handmade):
    path, known = handmade
    model = load_pretrained(path, dtype=torch.float32)
    assert any(c.shape[0] % 128 and c.shape[0] > 128 for c, _ in known.values())   # partial edge blocks, several blocks
    for key, (codes, scales) in known.items():
        want = codes.float() * expand(scales, codes.shape, (128, 128))
        assert torch.equal(hf_to_param(model, key), want), key


def test_fp8_load_keeps_the_stored_bytes_and_scales(handmade):
    path, known = handmade
    model = load_pretrained(path, dtype=torch.float32, quantize="fp8")
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    assert isinstance(attn.q_b_proj, Fp8Linear) and isinstance(mlp.experts, Fp8GroupedExperts)
    assert isinstance(attn.kv_b_proj, torch.nn.Linear) and attn.kv_b_proj.weight.dtype == torch.float32
    key = "model.layers.1.self_attn.q_b_proj.weight"
    assert torch.equal(attn.q_b_proj.weight.view(torch.uint8), known[key][0].view(torch.uint8))
    assert torch.equal(attn.q_b_proj.weight_scale_inv, known[key][1])
    up = known["model.layers.1.mlp.experts.2.up_proj.weight"]
    nb = mlp.experts.gate_up_proj_scale_inv.shape[1] // 2
    assert torch.equal(mlp.experts.gate_up_proj[2, 48:].view(torch.uint8), up[0].view(torch.uint8))
    assert torch.equal(mlp.experts.gate_up_proj_scale_inv[2, nb:], up[1])
    kv_b = known["model.layers.1.self_attn.kv_b_proj.weight"]
    assert torch.equal(attn.kv_b_proj.weight, kv_b[0].float() * expand(kv_b[1], kv_b[0].shape, (128, 128)))
    # prefill widens one layer at a time: the same logits as the dequantized float model
    ref = load_pretrained(path, dtype=torch.float32)
    x = torch.randint(2, 160, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_broken_fp8_checkpoints_are_refused_by_tensor_name(handmade, tmp_path):
    path, known = handmade
    state = load_file(path / "model.safetensors")
    cfg = (path / "config.json").read_text()
    key = "model.layers.0.mlp.down_proj.weight"

    def write(s, config=cfg):
        d = tmp_path / f"ck{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        save_file(s, d / "model.safetensors")
        (d / "config.json").write_text(config)
        return d

    missing = write({k: v for k, v in state.items() if k != f"{key}_scale_inv"})
    with pytest.raises(CheckpointError, match=f"'{key}' is float8 but its block scales '{key}_scale_inv' are missing"):
        load_pretrained(missing)
    bad = write(state | {f"{key}_scale_inv": torch.ones(1, 1)})
    with pytest.raises(CheckpointError, match=rf"'{key}_scale_inv' has shape \[1, 1\].*needs \[2, 3\]"):
        load_pretrained(bad, quantize="fp8")
    other = write(state, json.dumps(json.loads(cfg) | {"quantization_config": {"quant_method": "gptq"}}))
    with pytest.raises(CheckpointError, match="quant_method 'gptq'"):
        load_pretrained(other)


def test_convert_to_fp8_and_back_stays_close_and_transformers_reads_the_float_export(hf_checkpoint, tmp_path):
    """dsv2 convert --dtype fp8 writes DeepSeek's format; loaded back, logits stay within the bound
    docs/deployment.md states of the float model's; the bf16
    export of the FP8-loaded model is a checkpoint transformers loads, with our logits."""
    from transformers import AutoModelForCausalLM
    src = hf_checkpoint("v2", **SHAPES)
    assert main(["convert", str(src), str(tmp_path / "fp8"), "--dtype", "fp8"]) == 0
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight").dtype == FP8
        assert f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv").shape == (1, 2)
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    ref = load_pretrained(src, dtype=torch.float32)
    q = load_pretrained(tmp_path / "fp8", dtype="fp8")
    x = torch.randint(2, 160, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(x), q(x)
    # e4m3 rounds each weight by up to 1/16 (2.6% rms per matmul); this random 3-layer model (weights at
    # std 0.15) compounds that to 13% rms on its logits, measured. A broken scale or block would be ~100%.
    assert (a - b).norm() / a.norm() < 0.2
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.7
    save_pretrained(load_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, quantize="fp8"), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    ours = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    with torch.no_grad():
        c = ours(x)
        assert torch.allclose(theirs(x).logits, c, atol=1e-4, rtol=1e-4)
    assert (c - b).norm() / b.norm() < 0.02   # the export is the FP8 model, rounded to bf16


def test_llm_and_cli_take_quantize_fp8(hf_checkpoint, capsys):
    src = hf_checkpoint("v2")
    llm = dsv2.LLM(src, quantize="fp8", dtype="float32")
    assert llm.model.quantized == "fp8"
    [a] = llm.generate([[3, 4, 5]], max_new_tokens=4, ignore_eos=True)
    [b] = dsv2.LLM(src, dtype="float32").generate([[3, 4, 5]], max_new_tokens=4, ignore_eos=True)
    assert a.token_ids[0] == b.token_ids[0]
    with pytest.raises(ValueError, match="unknown quantize 'fp4'"):
        dsv2.LLM(src, quantize="fp4")


def test_gpu_block_scaled_matmul_keeps_only_a_layout_that_gives_the_widened_result(monkeypatch, capsys):
    """No GPU here: torch._scaled_mm is replaced by fakes. A layout whose numbers are wrong is
    skipped, the first right one is kept and reused; when none works the layer widens instead."""
    from dsv2.quant import fp8
    w = torch.randn(256, 384)
    q, s = quantize_blocks(w)
    x = torch.randn(5, 384)
    want = x @ dequantize_blocks(q, s).t()

    def fake(a, b, scale_a, scale_b, out_dtype):
        if scale_a.is_contiguous():                       # this "GPU" reads the activations' scales M-major
            return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype)
        sa = scale_a.repeat_interleave(128, 1)
        sb = scale_b.repeat_interleave(128, 0).repeat_interleave(128, 1)
        return ((a.float() * sa) @ (b.float() * sb)).to(out_dtype)

    monkeypatch.setattr(fp8, "_gpu", {"layout": None, "off": False})
    monkeypatch.setattr(torch, "_scaled_mm", fake)
    y = fp8._gpu_mm(x, q, s, (128, 128))
    assert fp8._gpu["layout"] == (1, 0) and (y.float() - want).norm() < 0.1 * want.norm()
    assert fp8._gpu_mm(x, q, s, (128, 128)) is not None
    monkeypatch.setattr(fp8, "_gpu", {"layout": None, "off": False})
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not on this card")))
    assert fp8._gpu_mm(x, q, s, (128, 128)) is None and fp8._gpu["off"]
    assert "widening each layer's weights instead" in capsys.readouterr().err


def test_dtype_casts_leave_float8_codes_and_scales_alone(hf_checkpoint):
    ref = load_pretrained(hf_checkpoint("v2"), dtype=torch.float32)
    m = load_pretrained(hf_checkpoint("v2"), dtype=torch.float32, quantize="fp8")
    assert m.num_params() == ref.num_params()   # float8 matrices counted like the float ones
    layer = m.layers[1].mlp.experts
    codes, scales = layer.gate_up_proj.clone(), layer.gate_up_proj_scale_inv.clone()
    m = m.to(torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16 and layer.gate_up_proj.dtype == FP8
    assert torch.equal(layer.gate_up_proj.view(torch.uint8), codes.view(torch.uint8))
    assert layer.gate_up_proj_scale_inv.dtype == torch.float32 and torch.equal(layer.gate_up_proj_scale_inv, scales)
