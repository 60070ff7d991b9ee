"""Training config: one dataclass family, filled from YAML, then from dotted overrides.

    cfg = load_config("tiny", ["steps=200", "optim.lr=1e-3", "model.num_hidden_layers=2"])

`--config NAME` reads `dsv2/presets/pretrain/NAME.yaml` (shipped with the package);
`--config path.yaml` reads that file. Every override is `section.key=value` (or `key=value`
for top-level keys), parsed as YAML, so `moe.drop_tokens=false` and `optim.decay_at=[0.8,0.9]`
work. Unknown keys are rejected with a sentence naming the key and the valid ones.

The `model` section is a preset name plus any ModelConfig field (HF names), so the
architecture, and with it device-limited routing (`topk_method: group_limited_greedy`,
`n_group` = D, `topk_group` = M), is switched from the same file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, ModelConfig

PRETRAIN_PRESETS = Path(__file__).resolve().parent.parent / "presets" / "pretrain"


@dataclass
class DataConfig:
    dir: str = "runs/data"              # output of `dsv2 data prepare`
    seq_len: int = 256                  # tokens per training window
    val_batches: int = 8                # validation: this many micro-batches of fixed val windows
    document_mask: bool = False         # true: documents sharing a window attend only within themselves,
                                        # positions restarting at each BOS (block-diagonal, as SFT packing);
                                        # false: the window is one sequence across document boundaries


@dataclass
class OptimConfig:
    lr: float = 2.4e-4                  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1           # matrices only; norms are not decayed
    grad_clip: float = 1.0
    warmup_steps: int = 2000            # linear warmup
    schedule: str = "step"              # after warmup: step (the paper's pretraining), cosine or constant
    decay_at: list = field(default_factory=lambda: [0.6, 0.9])  # fractions of total tokens
    decay_factor: float = 0.316         # lr multiplier at each decay point
    min_lr_factor: float = 0.1          # cosine: the lr it ends at, as a fraction of lr
    fused: bool = True                  # fused AdamW kernel where torch has one


@dataclass
class BatchConfig:
    micro_batch: int = 8                # sequences per forward/backward
    start: int = 8                      # sequences per optimizer step at the start ...
    final: int = 8                      # ... growing linearly to this ...
    ramp_tokens: int = 0                # ... over this many tokens (0: constant `final`)


@dataclass
class MoEConfig:
    exp_bal: float = 0.003              # a1, L_ExpBal (0 turns it off)
    dev_bal: float = 0.05               # a2, L_DevBal
    comm_bal: float = 0.02              # a3, L_CommBal
    device_groups: int | None = None    # D for losses and dropping; null = the model's n_group (else 1)
    drop_tokens: bool = True            # device-level capacity token dropping (training only)
    capacity_factor: float = 1.0        # capacity = factor x average tokens per device group
    protect_fraction: float = 0.1       # share of sequences never dropped
    load_every: int = 10                # log tokens per expert per layer every this many steps


@dataclass
class TrainConfig:
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    out_dir: str = "runs/pretrain"
    steps: int = 1000                   # optimizer steps
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    precision: str = "auto"             # bf16 (autocast, fp32 master weights) | fp32 | auto (see loop.py)
    compile: bool = False               # torch.compile the step model
    threads: int | None = None          # torch CPU threads (null: torch's default)
    log_every: int = 10
    eval_every: int = 100
    save_every: int = 100
    keep_last: int = 3                  # checkpoints kept on disk
    export: bool = True                 # write an HF directory (+ tokenizer) at the end
    peak_tflops: float | None = None    # for MFU; null = known GPUs only
    init_from: str = ""                 # continue from these weights (an HF folder or a step_* checkpoint of one
                                        # process), fresh optimizer and schedule; `model` keys then override its
                                        # config, as long as every weight keeps its shape (rope_scaling, context)

    def model_config(self) -> ModelConfig:
        d = dict(self.model)
        if self.init_from:
            return extended_config(self.init_from, d)
        if "preset" not in d and "hidden_size" not in d:
            raise ConfigError("the model section names neither a preset nor an architecture: add model.preset=NAME, "
                              "or init_from=PATH to continue a trained model (as --config extend-yarn does).")
        preset = d.pop("preset", None)
        return ModelConfig.from_preset(preset, **d) if preset else ModelConfig.from_dict(d)

    def validate(self) -> None:
        def need(ok, key, why):
            if not ok:
                raise ConfigError(f"training config '{key}' is invalid: {why}.")
        b = self.batch
        need(b.micro_batch > 0, "batch.micro_batch", "it must be positive")
        need(b.start % b.micro_batch == 0 and b.final % b.micro_batch == 0 and b.start > 0, "batch.start/final",
             f"both must be positive multiples of batch.micro_batch ({b.micro_batch})")
        need(self.steps > 0, "steps", "it must be positive")
        need(self.precision in ("auto", "bf16", "fp32"), "precision", "use auto, bf16 or fp32")
        need(all(0 < f < 1 for f in self.optim.decay_at), "optim.decay_at", "fractions must be in (0, 1)")
        need(self.optim.schedule in ("step", "cosine", "constant"), "optim.schedule", "use step, cosine or constant")
        need(self.moe.capacity_factor > 0, "moe.capacity_factor", "it must be positive")
        need(0 <= self.moe.protect_fraction <= 1, "moe.protect_fraction", "it must be in [0, 1]")
        need(self.data.seq_len > 1, "data.seq_len", "it must be at least 2")
        self.check_model()

    def check_model(self) -> None:
        self.model_config()  # raises ConfigError naming the model field

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def init_from_config(path: str | Path) -> ModelConfig:
    """The architecture of init_from: an HF folder's config.json, or a one-process training
    checkpoint's (step_*/state.pt beside the meta.json that holds its training config)."""
    p = Path(path)
    if (p / "config.json").exists():
        return ModelConfig.from_json(p)
    if (p / "state.pt").exists() and (p / "meta.json").exists():
        import json
        meta = json.loads((p / "meta.json").read_text())
        if "config" in meta:
            return from_dict(meta["config"]).model_config()
    raise ConfigError(f"init_from {path} is neither a Hugging Face folder (config.json) nor a one-process training "
                      "checkpoint (step_*/state.pt + meta.json); export a multi-process one with `dsv2 export` first.")


def extended_config(init_from: str | Path, overrides: dict) -> ModelConfig:
    """init_from's config with `model` overrides merged in (nested dicts such as rope_scaling key by
    key). An override that would change a weight's shape is refused: the weights would not fit."""
    if "preset" in overrides:
        raise ConfigError("init_from takes the architecture from the checkpoint: drop model.preset (model.* keys "
                          "override its config, e.g. model.rope_scaling.factor=4; see --config extend-yarn).")
    base = init_from_config(init_from)
    d = base.to_dict()
    for k, v in overrides.items():
        d[k] = (dict(d[k]) | v) if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    cfg = ModelConfig.from_dict(d)
    import torch

    from ..model import DeepseekV2
    with torch.device("meta"):
        old, new = DeepseekV2(base).state_dict(), DeepseekV2(cfg).state_dict()
    for name, t in old.items():
        if name not in new or new[name].shape != t.shape:
            raise ConfigError(f"model overrides {sorted(overrides)} change the weight '{name}' "
                              f"({list(t.shape)} in init_from): with init_from only shape-preserving fields "
                              "(rope_scaling, rope_theta, max_position_embeddings, ...) may change.")
    return cfg


def _fill(cls, d: dict, where: str):
    names = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in (d or {}).items():
        if k not in names:
            raise ConfigError(f"unknown training config key '{where}{k}': valid keys are {', '.join(names)}.")
        sub = names[k].default_factory if names[k].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub and sub()):
            if not isinstance(v, dict):
                raise ConfigError(f"training config '{where}{k}' must be a mapping of keys, got {v!r}.")
            v = _fill(type(sub()), v, f"{where}{k}.")
        elif names[k].default is not dataclasses.MISSING:
            v = _coerce(v, names[k].default, f"{where}{k}")
        kwargs[k] = v
    return cls(**kwargs)


def _coerce(v, default, key: str):
    """Match the default's type; YAML reads '1e-3' as a string, so numbers are converted."""
    if default is None or v is None or isinstance(default, str):
        return v
    if isinstance(default, bool):
        if not isinstance(v, bool):
            raise ConfigError(f"training config '{key}' must be true or false, got {v!r}.")
        return v
    try:
        if isinstance(default, int) and not isinstance(v, bool) and float(v) == int(float(v)):
            return int(float(v))
        if isinstance(default, float) and not isinstance(v, bool):
            return float(v)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"training config '{key}' must be a {type(default).__name__}, got {v!r}.")


def from_dict(d: dict, cls: type = TrainConfig) -> TrainConfig:
    cfg = _fill(cls, d, "")
    cfg.validate()
    return cfg


def resolve_path(name_or_path: str, presets: Path = PRETRAIN_PRESETS) -> Path:
    p = Path(name_or_path)
    names = ", ".join(list_pretrain_presets(presets))
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FileNotFoundError(f"no config file at {p}: give a preset name ({names}) or an existing .yaml path.")
        return p
    p = presets / f"{name_or_path}.yaml"
    if not p.exists():
        raise ConfigError(f"unknown {presets.name} config '{name_or_path}': choose one of {names} or give a .yaml path.")
    return p


def list_pretrain_presets(presets: Path = PRETRAIN_PRESETS) -> list[str]:
    return sorted(p.stem for p in presets.glob("*.yaml"))


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Set `a.b.c=value` (value parsed as YAML) inside nested dict `d`."""
    d = yaml.safe_load(yaml.safe_dump(d))  # deep copy
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' has no '=': write it as section.key=value, e.g. optim.lr=1e-3.")
        key, raw = item.split("=", 1)
        value: Any = yaml.safe_load(raw) if raw != "" else None
        parts = key.strip().split(".")
        node = d
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section.")
        node[parts[-1]] = value
    return d


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None, cls: type = TrainConfig,
                presets: Path = PRETRAIN_PRESETS) -> TrainConfig:
    """A preset of `presets` (or a .yaml path) with dotted overrides, as a `cls` (TrainConfig or a subclass)."""
    path = resolve_path(name_or_path, presets)
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({e}).") from None
    return from_dict(apply_overrides(d, overrides or []), cls)
