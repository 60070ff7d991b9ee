"""What every stage that starts from a trained checkpoint shares: `init_from`, its tokenizer, its export.

`FinetuneConfig` is a TrainConfig whose architecture is the checkpoint's (config.json of
`init_from`), and `FinetuneTrainer` the pretraining Trainer whose model is loaded from it
(fp32 master weights) and whose export carries the tokenizer with the chat template the
model was trained with. SFT (sft.py) and GRPO (grpo_trainer.py) add their data and objective.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig
from ..tokenizer import DEEPSEEK_CHAT_TEMPLATE, Tokenizer, load_tokenizer
from ..train.config import TrainConfig
from ..train.loop import Trainer

PRESETS = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class FinetuneConfig(TrainConfig):
    model: dict = field(default_factory=dict)         # unused: the architecture is init_from's
    init_from: str = ""                 # the Hugging Face checkpoint (weights + tokenizer) to start from
    stage = "fine-tuning"               # the verb, for messages

    def model_config(self) -> ModelConfig:
        if not self.init_from:
            raise ConfigError(f"{self.stage} needs the checkpoint to start from: add init_from=PATH "
                              "(a Hugging Face folder).")
        return ModelConfig.from_json(self.init_from)

    def validate(self) -> None:
        if self.model:
            raise ConfigError(f"{self.stage} takes its architecture from init_from: leave the 'model' section out.")
        super().validate()

    def check_model(self) -> None:
        pass                            # init_from is read when training starts (a preset prints without it)


class FinetuneTrainer(Trainer):
    baseline: float | None = None       # the held-out score before training (fit() sets it on a fresh run)

    def build_model(self, mcfg: ModelConfig, device: torch.device):
        from ..checkpoint import load_pretrained
        if device.type == "meta":
            raise ValueError(f"--meta-init draws fresh weights, but {self.name} starts from init_from's: "
                             "leave --meta-init out.")
        # fp32 master weights whatever the checkpoint's dtype (autocast gives bf16 compute)
        return load_pretrained(self.cfg.init_from, dtype=torch.float32, device=device).train()

    def fit(self, resume: str | None = None) -> dict:
        """Train; a fresh run first scores the held-out set, the baseline every later evaluation is shown beside."""
        resuming = bool(resume) and (resume != "auto" or self.checkpointer.latest() is not None)
        if not resuming:
            self.baseline = self.evaluate()
            if self.baseline is not None:
                self.print(f"{self.baseline_name}: {self.val_name} {self.baseline:.4f}{self.val_unit}"
                           + "".join(f", {k} {v:.4f}" for k, v in self.val_extra().items()))
        return super().fit(resume=resume)

    def load_tokenizer(self) -> Tokenizer:
        """init_from's tokenizer; the export gets it with the chat template written in."""
        tok = load_tokenizer(self.cfg.init_from, self.model.config.vocab_size)
        self.tokenizer = tok
        self.tokenizer_dir = self.out / "tokenizer"
        if self.is_main:
            write_chat_tokenizer(tok, self.cfg.init_from, self.tokenizer_dir)
        return tok


def write_chat_tokenizer(tok: Tokenizer, src: str | os.PathLike, dst: Path) -> None:
    """The tokenizer files for the export, with the chat template the model was trained with
    written into tokenizer_config.json when the source had none (so transformers'
    apply_chat_template and `dsv2 serve` render chats the same way)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        if (Path(src) / name).exists():
            shutil.copyfile(Path(src) / name, dst / name)
    cfg_file = Path(src) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    cfg.setdefault("chat_template", tok.chat_template or DEEPSEEK_CHAT_TEMPLATE)
    tmp = dst / f".tokenizer_config.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    os.replace(tmp, dst / "tokenizer_config.json")
