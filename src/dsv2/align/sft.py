"""Supervised fine-tuning: the pretraining loop with chat data, assistant-only loss and packing.

    dsv2 sft --config demo init_from=runs/demo/pretrain/hf data.train=train.jsonl data.val=val.jsonl
    dsv2 sft --config deepseek-v2 init_from=DeepSeek-V2-Lite data.train=chats.jsonl device=cuda
    dsv2 sft --config my.yaml --resume auto
    torchrun --nproc-per-node 8 -m dsv2 sft --config deepseek-v2 --ep 8 init_from=... data.train=...

`SFTTrainer` is the pretraining `Trainer` (train/loop.py) with three seams replaced: the
model comes from `init_from` (weights and tokenizer), the data is conversations
tokenised with assistant-only labels (align/conversations.py) and packed into rows
(data/packing.py), and validation is the loss on the held-out answers. Everything else is
the loop's: AdamW, warmup then cosine / constant / step decay, clipping, bf16 autocast,
gradient accumulation with the loss divided by the supervised tokens of the whole
(global) step, the balance losses, checkpoints with `--resume auto`, metrics and plots,
torchrun with FSDP2 and expert parallelism, and the Hugging Face export, whose tokenizer
carries the chat template the model was trained with.

The paper's SFT (DeepSeek-V2 Chat): 1.5M conversations, 2 epochs, lr 5e-6
(presets/sft/deepseek-v2.yaml). `epochs` turns into steps once the data is packed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from ..config import ConfigError
from ..data.loader import Batch
from ..data.packing import OVERLONG, PackedLoader, pack
from ..tokenizer import Tokenizer
from .conversations import read_conversations, shifted, tokenize_conversation
from .finetune import PRESETS, FinetuneConfig, FinetuneTrainer

__all__ = ["SFTConfig", "SFTDataConfig", "SFTTrainer", "tokenize_conversation", "SFT_PRESETS"]

SFT_PRESETS = PRESETS / "sft"


@dataclass
class SFTDataConfig:
    train: str = ""                     # JSONL conversations (align/conversations.py has the two shapes)
    val: str | None = None              # held-out JSONL: loss on its answers every eval_every (null: none)
    seq_len: int = 4096                 # tokens per row
    packing: bool = True                # several examples per row, attention kept inside each; false: one per row
    overlong: str = "truncate"          # an example over seq_len tokens: truncate (keep its start) or drop


@dataclass
class SFTConfig(FinetuneConfig):
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    out_dir: str = "runs/sft"
    epochs: float = 0.0                 # > 0: train this many passes over the rows (steps is then derived)
    stage = "sft"

    def validate(self) -> None:
        if self.data.overlong not in OVERLONG:
            raise ConfigError(f"training config 'data.overlong' is invalid: use {' or '.join(OVERLONG)}.")
        if self.epochs < 0:
            raise ConfigError("training config 'epochs' is invalid: it must be >= 0 (0: use steps).")
        super().validate()


class SFTTrainer(FinetuneTrainer):
    name = "sft"
    baseline_name = "before fine-tuning"
    val_unit = " nats per answer token"

    def build_data(self, dp_rank: int, dp_size: int) -> None:
        cfg, d = self.cfg, self.cfg.data
        if not d.train:
            raise ValueError("sft needs training conversations: add data.train=FILE.jsonl.")
        tok = self.load_tokenizer()
        packed = self._pack(d.train, tok)
        self.train_data = PackedLoader(packed, cfg.seed, dp_rank, dp_size)
        self.val_data = PackedLoader(self._pack(d.val, tok), cfg.seed) if d.val else None
        if cfg.epochs > 0:
            cfg.steps = max(1, math.ceil(cfg.epochs * packed.rows / (cfg.batch.final * dp_size)))

    def _pack(self, path: str, tok: Tokenizer):
        d = self.cfg.data
        convs = read_conversations(path)
        if self.is_main:
            convs.report(path)
        examples = [shifted(*tokenize_conversation(tok, m)) for m in _progress(convs.messages, path, self.is_main)]
        packed = pack(examples, d.seq_len, d.overlong, d.packing, pad_id=tok.eos_id or 0)
        if not packed.rows:
            raise ValueError(f"no example of {path} has a supervised token within data.seq_len={d.seq_len}.")
        self.print(f"{path}: {len(convs.messages):,} conversations -> {packed.rows:,} rows of {d.seq_len} tokens "
                   f"({'packed' if d.packing else 'one per row'}, {100 * packed.padding_fraction:.1f}% padding); "
                   f"{sum((packed.targets >= 0).sum(1)):,} supervised tokens; {packed.truncated} truncated, "
                   f"{len(packed.dropped)} dropped (over seq_len or nothing to learn)")
        return packed

    def next_micro_batch(self, n: int) -> tuple[Batch, torch.Tensor]:
        return self.train_data.next_batch(n)

    def val_batches(self) -> Iterator[Batch]:
        if self.val_data is not None:
            yield from self.val_data.fixed_batches(self.cfg.batch.micro_batch)

    def evaluate(self) -> float | None:
        return super().evaluate() if self.val_data is not None else None


def _progress(items, path, show: bool):
    if not show or len(items) < 5000:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=f"tokenising {Path(path).name}", unit=" conversations", disable=None)  # off without a TTY


def load_sft_config(name_or_path: str, overrides: list[str] | None = None) -> SFTConfig:
    from ..train.config import load_config
    return load_config(name_or_path, overrides, cls=SFTConfig, presets=SFT_PRESETS)
