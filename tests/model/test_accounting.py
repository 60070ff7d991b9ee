"""Parameter, FLOP and KV-cache accounting of the paper's models, built on the meta device."""

import pytest
import torch

from dsv2 import DeepseekV2, ModelConfig


def meta_model(preset: str) -> DeepseekV2:
    with torch.device("meta"):
        return DeepseekV2(ModelConfig.from_preset(preset))


@pytest.mark.parametrize("preset,total,active", [("deepseek-v2", 236e9, 21e9), ("deepseek-v2-lite", 15.7e9, 2.4e9)])
def test_paper_parameter_counts(preset, total, active):
    m = meta_model(preset)
    assert m.num_params() == pytest.approx(total, rel=0.03)
    assert m.active_params() == pytest.approx(active, rel=0.03)


def test_small_preset_is_the_benchmarked_config():
    assert meta_model("small").num_params() == pytest.approx(67.7e6, rel=0.001)


@pytest.mark.parametrize("preset", ["deepseek-v2", "deepseek-v2-lite", "small", "tiny"])
def test_kv_cache_bytes_are_latent_plus_rope_key(preset):
    m = meta_model(preset)
    cfg = m.config
    assert m.kv_cache_bytes_per_token(torch.bfloat16, per_layer=True) == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert m.kv_cache_bytes_per_token(torch.float32) == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4 * cfg.num_hidden_layers


def test_flops_per_token_counts_active_params_and_attention():
    m = meta_model("deepseek-v2")
    assert m.flops_per_token(1) == pytest.approx(2 * m.active_params(), rel=1e-3)
    assert m.flops_per_token(4096, training=True) == pytest.approx(3 * m.flops_per_token(4096))
    assert m.flops_per_token(4096) > m.flops_per_token(1024)
