"""Full-size loading on reduced shapes: the checkpoint generator, stream-quantized loading, the
plain-read shard reader and the memory pre-flight. (The 31 GB run is bench/full_size.py.)"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch

from dsv2.bench.make_checkpoint import tensor_layout, write_checkpoint
from dsv2.checkpoint import CheckpointError, _Shard, load_pretrained
from dsv2.config import ModelConfig
from dsv2.engine.memory import DoesNotFit, plan_memory, preflight
from dsv2.quant import quantize
from dsv2.quant.int8 import quantize_rows

# DeepSeek-V2-Lite's widths (hidden 2048, 16 heads of 128 + 64, latent 512, experts of 1408, the
# dense layer's 10944) in 2 layers, with 8 experts and an 8,192-token vocabulary so it stays small
# (~430 MB of bf16) while the head still spans two of int8's 4,096-row rounding chunks.
LITE_WIDTHS = dict(n_routed_experts=8, vocab_size=8192, bos_token_id=8000, eos_token_id=8001)


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    return write_checkpoint("deepseek-v2-lite", tmp_path_factory.mktemp("lite"), layers=2, verbose=False,
                            shard_gb=0.15, overrides=LITE_WIDTHS)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ generator
def test_generator_writes_released_layout(lite):
    cfg = ModelConfig.from_json(lite)
    assert (cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_hidden_layers) == (2048, 1408, 2)
    index = json.loads((lite / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(k for k, _ in tensor_layout(cfg))
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    total = 0
    for name in shards:
        with _Shard(lite / name) as f:
            for key in f.keys():
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16 and torch.isfinite(t).all()
                total += t.numel() * 2
                if key.endswith("norm.weight"):
                    assert (t == 1).all()
    assert total == index["metadata"]["total_size"]


def test_generator_safetensors_files_are_standard(lite):
    from safetensors import safe_open
    name = json.loads((lite / "model.safetensors.index.json").read_text())["weight_map"]["model.embed_tokens.weight"]
    with safe_open(str(lite / name), "pt") as f, _Shard(lite / name) as g:
        for key in f.keys():
            assert torch.equal(f.get_tensor(key), g.get_tensor(key))


def test_generator_is_deterministic_and_seeded(tmp_path):
    kw = dict(layers=1, verbose=False, overrides=dict(LITE_WIDTHS, hidden_size=256, intermediate_size=512,
                                                      moe_intermediate_size=64, kv_lora_rank=64))
    a = write_checkpoint("deepseek-v2-lite", tmp_path / "a", seed=1, **kw)
    b = write_checkpoint("deepseek-v2-lite", tmp_path / "b", seed=1, **kw)
    c = write_checkpoint("deepseek-v2-lite", tmp_path / "c", seed=2, **kw)
    name = "model-00001-of-00001.safetensors"
    assert _sha(a / name) == _sha(b / name) != _sha(c / name)
    with pytest.raises(ValueError, match="--layers 99"):
        write_checkpoint("deepseek-v2-lite", tmp_path / "d", layers=99, verbose=False)


def test_generator_tokenizer_fits_the_config(lite):
    from transformers import AutoTokenizer

    from dsv2.tokenizer import load_tokenizer
    tok = load_tokenizer(lite, 8192)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (8000, 8001, 8002)
    ids = tok.encode("def main():\n    return 42")
    assert ids[0] == 8000 and tok.decode(ids[1:]) == "def main():\n    return 42"
    hf = AutoTokenizer.from_pretrained(str(lite))
    assert hf.encode("def main():\n    return 42") == ids
    prompt = hf.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<｜begin▁of▁sentence｜>User: hi\n\nAssistant:"


def test_transformers_loads_the_generated_checkpoint(lite):
    from transformers import DeepseekV2ForCausalLM
    ref = DeepseekV2ForCausalLM.from_pretrained(str(lite), torch_dtype=torch.float32).eval()
    ours = load_pretrained(lite, dtype=torch.float32)
    ids = torch.randint(0, 8000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert torch.isfinite(got).all() and got.std() > 0.1
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------ streaming
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_stream_quantized_equals_load_then_quantize(lite, kind):
    from dsv2.engine.llm import LLM
    streamed = load_pretrained(lite, quantize=kind)
    after = quantize(load_pretrained(lite), kind)
    sa, sb = streamed.state_dict(), after.state_dict()
    assert sa.keys() == sb.keys()
    coded = [k for k, t in sa.items() if t.dtype in (torch.int8, torch.float8_e4m3fn)]
    for name in ("layers.0.self_attn.q_proj.", "layers.1.self_attn.o_proj.", "layers.0.mlp.down_proj.",
                 "layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.shared_experts.up_proj."):
        assert any(k.startswith(name) for k in coded), f"{name} was not quantized"
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, 8000, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(streamed(ids), after(ids))
    prompts = [[8000, 5, 17, 99], [8000, 1234, 7]]
    a = LLM(streamed).generate(prompts, max_new_tokens=6)
    b = LLM(after).generate(prompts, max_new_tokens=6)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_native_row_quantizer_rounds_like_the_reference():
    w = torch.randn(5, 300, 96) * torch.rand(5, 300, 1)
    w[0, 0] = 0                                                    # an all-zero row
    w[1, 1, :4] = torch.tensor([127.0, -127.0, 63.5, 0.5])         # ties round to even
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = w.to(dtype)
        (qa, sa), (qb, sb) = quantize_rows(x), quantize_rows(x, chunk=64, native=False)
        assert torch.equal(qa, qb) and torch.equal(sa, sb) and qa.dtype == torch.int8 and sa.shape == (5, 300)


# ------------------------------------------------------------------ shard reader
def test_shard_reader_reads_every_dtype_and_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file
    tensors = {"bf16": torch.randn(3, 4).bfloat16(), "f32": torch.randn(5), "i8": torch.arange(-4, 4, dtype=torch.int8),
               "f8": torch.randn(2, 8).to(torch.float8_e4m3fn), "flag": torch.tensor([True, False]),
               "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    save_file(tensors, tmp_path / "a.safetensors")
    with _Shard(tmp_path / "a.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got.view(-1).view(torch.uint8),
                                                                                  t.reshape(-1).view(torch.uint8))
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(data[:-4])
    with _Shard(tmp_path / "b.safetensors") as f, pytest.raises(CheckpointError, match="truncated"):
        for k in f.keys():
            f.get_tensor(k)
    (tmp_path / "c.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        _Shard(tmp_path / "c.safetensors")


# ------------------------------------------------------------------ pre-flight
@pytest.mark.parametrize("kind", [None, "int8", "fp8"])
def test_preflight_counts_the_weights_exactly(lite, kind):
    plan = plan_memory(lite, quantize=kind, max_len=1024, slots=2)
    model = load_pretrained(lite, quantize=kind)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert plan.weights == held
    cfg = model.config
    assert plan.cache == 2 * 1024 * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert plan.peak > plan.weights + plan.cache


def test_preflight_refuses_before_reading_and_names_what_fits(lite, monkeypatch):
    import dsv2.engine.memory as memory
    need_int8 = plan_memory(lite, quantize="int8").peak - memory.rss_bytes()
    need_bf16 = plan_memory(lite).peak - memory.rss_bytes()
    assert need_int8 < need_bf16
    monkeypatch.setattr(memory, "available_bytes", lambda: (need_int8 + need_bf16) // 2)
    monkeypatch.setattr(_Shard, "get_tensor", lambda *a: pytest.fail("a weight was read"))
    with pytest.raises(DoesNotFit, match=r"needs about [\d.]+ GiB more memory .* --quantize int8 would need"):
        preflight(lite)
    from dsv2.engine.llm import LLM
    with pytest.raises(DoesNotFit, match="--quantize int8"):
        LLM(lite)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    with pytest.raises(DoesNotFit, match="no smaller option fits"):
        preflight(lite, quantize="int8")


def test_cache_larger_than_memory_is_refused_in_one_sentence(monkeypatch):
    import dsv2.engine.memory as memory
    from dsv2.engine import Engine
    from dsv2.model import DeepseekV2
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    model = DeepseekV2(ModelConfig.from_preset("tiny", max_position_embeddings=100_000))
    with pytest.raises(DoesNotFit, match="latent cache of 4 slots x 100,000 positions needs"):
        Engine(model, max_batch_slots=4, max_len=100_000)


def test_info_prints_the_preflight(lite, capsys):
    from dsv2.cli import main
    assert main(["info", "--model", str(lite), "--quantize", "int8", "--max-len", "2048", "--slots", "4"]) == 0
    out = capsys.readouterr().out
    assert "memory pre-flight" in out and "4 slots x 2,048 positions" in out and "peak estimate" in out
