"""ModelConfig: presets, HF config.json spellings, and one clear sentence for bad values."""

from __future__ import annotations

import json

import pytest
import yaml

from dsv2 import ConfigError, ModelConfig
from dsv2.config import PRESET_DIR, list_presets


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_parses_and_every_key_is_commented(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg.num_hidden_layers > 0
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    assert text.lstrip().startswith("#")  # says what the preset is for
    keys = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert set(keys) <= set(cfg.to_dict())


def test_presets_cover_the_paper_models():
    assert {"deepseek-v2", "deepseek-v2-lite", "small", "tiny"} <= set(list_presets())
    v2, lite = ModelConfig.from_preset("deepseek-v2"), ModelConfig.from_preset("deepseek-v2-lite")
    assert (v2.n_group, v2.topk_group, v2.topk_method) == (8, 3, "group_limited_greedy")
    assert lite.q_lora_rank is None and v2.yarn["factor"] == 40


@pytest.mark.parametrize("override,field", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(topk_group=5), "topk_group"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(topk_method="best"), "topk_method"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
    (dict(rope_scaling={"type": "dynamic", "factor": 4}), "rope_scaling"),
])
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field}'") as e:
        ModelConfig.from_preset("tiny", **override)
    assert "\n" not in str(e.value)


def test_unknown_key_is_rejected_by_name():
    with pytest.raises(ConfigError, match="unknown config key 'hiden_size'"):
        ModelConfig.from_preset("tiny", hiden_size=12)


def test_hf_dict_round_trip_both_rope_spellings():
    cfg = ModelConfig.from_preset("deepseek-v2")
    hf = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(hf) == cfg
    # transformers 5 spelling: theta and scaling inside rope_parameters
    new = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = dict(hf["rope_scaling"], rope_type="yarn", rope_theta=10000.0)
    del new["rope_parameters"]["type"]
    assert ModelConfig.from_hf_dict(new) == cfg
    plain = dict(new, rope_parameters={"rope_type": "default", "rope_theta": 5e4})
    got = ModelConfig.from_hf_dict(plain)
    assert got.rope_scaling is None and got.rope_theta == 5e4


def test_transformers_written_config_loads(hf_checkpoint):
    cfg = ModelConfig.from_json(hf_checkpoint("yarn"))
    assert cfg.yarn["factor"] == 4.0 and cfg.q_lora_rank == 32


def test_non_deepseek_config_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type 'llama', not 'deepseek_v2'"):
        ModelConfig.from_json(tmp_path)


def test_real_v2_config_json_keys_load():
    """The keys of DeepSeek-V2's released config.json, including remote-code ones dsv2 does not use."""
    d = ModelConfig.from_preset("deepseek-v2").to_hf_dict()
    d.update(auto_map={"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, aux_loss_alpha=0.001,
             seq_aux=True, ep_size=1, torch_dtype="bfloat16", transformers_version="4.39.3")
    assert ModelConfig.from_hf_dict(d).n_routed_experts == 160


def test_yaml_presets_are_valid_yaml_mappings():
    for name in list_presets():
        assert isinstance(yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()), dict)
