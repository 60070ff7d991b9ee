"""The DeepSeek-V2 architecture config: one dataclass, HF `config.json` field names.

`ModelConfig` is the single source of truth for the model's shape. It is filled
from a preset (`presets/<name>.yaml`), from a Hugging Face `config.json`
(`ModelConfig.from_hf_dict`), or from a dict; every path goes through
`ModelConfig.from_dict`, which rejects unknown keys and invalid values with one
sentence naming the field.

Symbols of the paper (arXiv 2405.04434) beside each field:
d = hidden_size, n_h = num_attention_heads, d_c = kv_lora_rank,
d_c' = q_lora_rank, d_h = qk_nope_head_dim, d_h^R = qk_rope_head_dim,
N_s = n_shared_experts, N_r = n_routed_experts, K_r = num_experts_per_tok,
D = n_group (devices / expert groups), M = topk_group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

# Keys that HF config.json files carry for transformers' own bookkeeping. They say
# nothing about the architecture dsv2 builds, so they are read past silently.
_HF_BOOKKEEPING = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pretraining_tp", "output_router_logits", "head_dim", "qk_head_dim", "mlp_bias",
    "_name_or_path", "_attn_implementation", "aux_loss_alpha", "seq_aux", "ep_size",
    "attn_implementation", "return_dict", "output_hidden_states", "output_attentions",
    "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "quantization_config", "num_labels",
}
_YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "rope_theta", "attention_factor", "truncate"}


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the field and the fix."""


@dataclass
class ModelConfig:
    # --- vocabulary and trunk ---
    vocab_size: int = 102400
    hidden_size: int = 5120                  # d
    num_hidden_layers: int = 60
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006         # init std (the paper's 0.006)
    hidden_act: str = "silu"
    # --- Multi-head Latent Attention ---
    num_attention_heads: int = 128           # n_h
    num_key_value_heads: int | None = None   # HF field; MLA has no KV head grouping (= n_h)
    q_lora_rank: int | None = 1536           # d_c'; None = no query compression (V2-Lite)
    kv_lora_rank: int = 512                  # d_c
    qk_nope_head_dim: int = 128              # d_h
    qk_rope_head_dim: int = 64               # d_h^R
    v_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    # --- positions: RoPE + YaRN ---
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    # --- dense FFN (first_k_dense_replace layers) ---
    intermediate_size: int = 12288
    # --- DeepSeekMoE ---
    moe_intermediate_size: int = 1536
    n_shared_experts: int | None = 2         # N_s
    n_routed_experts: int | None = 160       # N_r
    num_experts_per_tok: int | None = 6      # K_r
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    routed_scaling_factor: float = 16.0
    topk_method: str = "group_limited_greedy"  # "greedy" | "group_limited_greedy"
    n_group: int | None = 8                  # D
    topk_group: int | None = 3               # M
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    # --- special tokens ---
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def need(ok: bool, name: str, why: str):
            if not ok:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)!r} is invalid: {why}.")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "intermediate_size", "moe_intermediate_size", "max_position_embeddings", "moe_layer_freq"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "it must be a positive integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "RoPE rotates pairs, so it must be even")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "it must be a positive integer, or null for no query compression")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"it must divide hidden_size ({self.hidden_size})")
        need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
             "MLA shares one latent across all heads, so it must equal num_attention_heads")
        need(self.hidden_act == "silu", "hidden_act", "DeepSeek-V2 experts are SwiGLU, so it must be 'silu'")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "it must be positive")
        need(self.rope_theta > 0, "rope_theta", "it must be positive")
        need(0.0 <= self.attention_dropout < 1.0, "attention_dropout", "it must be in [0, 1)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"it must be between 0 and num_hidden_layers ({self.num_hidden_layers})")
        if self.has_moe:
            need(isinstance(self.n_routed_experts, int) and self.n_routed_experts > 0, "n_routed_experts",
                 "it must be a positive integer when any layer is MoE")
            need(isinstance(self.num_experts_per_tok, int) and 0 < self.num_experts_per_tok <= self.n_routed_experts,
                 "num_experts_per_tok", f"it must be between 1 and n_routed_experts ({self.n_routed_experts})")
            need(self.n_shared_experts is None or self.n_shared_experts >= 0, "n_shared_experts",
                 "it must be 0 or more")
            need(self.topk_method in ("greedy", "group_limited_greedy"), "topk_method",
                 "it must be 'greedy' or 'group_limited_greedy'")
            need(self.scoring_func == "softmax", "scoring_func", "DeepSeek-V2 gates with 'softmax'")
            need(self.routed_scaling_factor > 0, "routed_scaling_factor", "it must be positive")
            if self.topk_method == "group_limited_greedy" or self.n_group not in (None, 1):
                need(isinstance(self.n_group, int) and self.n_group > 0 and self.n_routed_experts % self.n_group == 0,
                     "n_group", f"it must be a positive divisor of n_routed_experts ({self.n_routed_experts})")
                need(isinstance(self.topk_group, int) and 0 < self.topk_group <= self.n_group, "topk_group",
                     f"it must be between 1 and n_group ({self.n_group})")
                need(self.num_experts_per_tok <= self.topk_group * (self.n_routed_experts // self.n_group),
                     "num_experts_per_tok", "it must fit in the experts of the topk_group groups a token may use")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            need(isinstance(rs, dict), "rope_scaling", "it must be a mapping or null")
            unknown = set(rs) - _YARN_KEYS
            need(not unknown, "rope_scaling", f"unknown key(s) {sorted(unknown)}")
            kind = rs.get("type", rs.get("rope_type"))
            need(kind in ("yarn", "linear", "default", None), "rope_scaling",
                 f"type {kind!r} is not supported (use 'yarn', or 'linear' for position interpolation)")
            if kind in ("yarn", "linear"):
                need(isinstance(rs.get("factor"), (int, float)) and rs["factor"] >= 1, "rope_scaling",
                     f"{kind} needs 'factor' >= 1")
            if kind == "yarn":
                need(isinstance(rs.get("original_max_position_embeddings"), int), "rope_scaling",
                     "yarn needs an integer 'original_max_position_embeddings'")

    # ------------------------------------------------------------- derived
    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers and bool(self.n_routed_experts)

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters when rope scaling is on, else None."""
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("factor", 1) > 1:
            return rs
        return None

    # ----------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ConfigError(f"unknown config key '{unknown[0]}': it is not a DeepSeek-V2 field "
                              f"(check its spelling against dsv2/presets/*.yaml).")
        try:
            return cls(**d)
        except TypeError as e:  # a missing or doubled argument
            raise ConfigError(f"config could not be built: {e}.") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face `config.json` dict (old `rope_scaling` or new `rope_parameters` spelling)."""
        if d.get("model_type") != "deepseek_v2":
            raise ConfigError(f"{source} has model_type {d.get('model_type')!r}, not 'deepseek_v2': "
                              "dsv2 loads DeepSeek-V2 / DeepSeek-V2-Lite checkpoints only.")
        names = {f.name for f in fields(cls)}
        out = {}
        for k, v in d.items():
            if k in names:
                out[k] = v
            elif k not in _HF_BOOKKEEPING and k != "rope_parameters":
                warnings.warn(f"{source}: ignoring key '{k}', which dsv2 does not use.", stacklevel=2)
        rp = d.get("rope_parameters")
        if rp:  # transformers >= 5: theta and scaling live together
            rp = dict(rp)
            if "rope_theta" in rp:
                out["rope_theta"] = rp.pop("rope_theta")
            kind = rp.get("rope_type", rp.get("type", "default"))
            rp.pop("partial_rotary_factor", None)
            out["rope_scaling"] = None if kind == "default" else {k: v for k, v in rp.items() if k != "rope_type"} | {"type": kind}
        if out.get("rope_scaling"):
            rs = dict(out["rope_scaling"])
            rs["type"] = rs.pop("rope_type", rs.get("type"))
            rs.pop("rope_theta", None)
            out["rope_scaling"] = rs
        return cls.from_dict(out)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' DeepseekV2ForCausalLM (4.x remote code and 5.x) loads."""
        d = self.to_dict()
        d.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], use_cache=True,
                 pretraining_tp=1, num_key_value_heads=self.num_attention_heads, mlp_bias=False,
                 head_dim=self.qk_rope_head_dim)
        if self.n_group is None or self.topk_group is None:  # transformers wants both or neither
            d["n_group"], d["topk_group"] = (1, 1) if self.topk_method == "greedy" else (self.n_group, self.topk_group)
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json at {path}: point at a Hugging Face model directory.")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}).") from None
        return cls.from_hf_dict(d, source=str(path))

    # ------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        path = PRESET_DIR / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(list_presets())}.")
        d = yaml.safe_load(path.read_text()) or {}
        d.update(overrides)
        return cls.from_dict(d)


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature factor: 0.1 * mscale * ln(s) + 1 (1 when not scaling)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
