"""Reward models: a scalar head on a DeepSeek-V2 backbone, trained on preference pairs (Bradley-Terry).

    dsv2 rm train --config demo init_from=runs/demo/sft/hf data.train=pairs.jsonl data.val=held_out_pairs.jsonl
    grpo.rewards='{"rm:runs/rm/hf": 1.0}'                 # then a reward in dsv2 grpo

A pair is one JSON line: {"prompt": "...", "chosen": "...", "rejected": "..."} (answers to the
prompt) or {"chosen": [messages], "rejected": [messages]} (whole conversations). Each side is
rendered with the chat template, and the reward is the head's score at its last token:

    r(x) = w . h_last(x)              loss = -log sigmoid(r(chosen) - r(rejected))

The format is transformers' DeepseekV2ForSequenceClassification with num_labels = 1 (what
TRL's RewardTrainer writes): config.json with that architecture, the backbone's weights
under model.*, `score.weight` [1, hidden], no lm_head; the tokenizer beside it. It loads in
transformers (AutoModelForSequenceClassification) and here with `load_reward_model`.
Validation reports pairwise accuracy: the share of held-out pairs scored chosen > rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import DeepseekV2
from ..tokenizer import Tokenizer
from .conversations import read_jsonl, report_skipped
from .finetune import PRESETS, FinetuneConfig, FinetuneTrainer

RM_PRESETS = PRESETS / "rm"
ARCHITECTURE = "DeepseekV2ForSequenceClassification"


class RewardModelError(ValueError):
    pass


class RewardModel(nn.Module):
    """backbone (a DeepseekV2; its lm_head unused) + score: Linear(hidden, 1, no bias)."""

    def __init__(self, backbone: DeepseekV2, score: torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        self.score = nn.Linear(backbone.config.hidden_size, 1, bias=False)
        with torch.no_grad():
            self.score.weight.copy_(score if score is not None else torch.zeros_like(self.score.weight))

    @property
    def config(self):
        return self.backbone.config

    def num_params(self) -> int:
        return self.backbone.num_params() + self.score.weight.numel()

    def active_params(self) -> int:
        return self.backbone.active_params()

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        return self.backbone.flops_per_token(seq_len, training)

    def forward(self, input_ids: torch.Tensor, last: torch.Tensor, moe_hooks=None) -> torch.Tensor:
        """input_ids [B, T] (right-padded), last [B] the index of each row's last token -> rewards [B] float32.
        moe_hooks: the trainer's MoE rules (model/moe.py), in training forwards."""
        h = self.backbone.hidden_states(input_ids, moe_hooks=moe_hooks)
        return self.score(h[torch.arange(h.shape[0], device=h.device), last]).squeeze(-1).float()


def save_reward_model(rm: RewardModel, path, tokenizer_dir=None) -> None:
    from ..checkpoint import save_pretrained
    cfg = rm.config
    save_pretrained(rm.backbone, path, tokenizer_dir=tokenizer_dir, heads={"score.weight": rm.score.weight},
                    config_extra={"architectures": [ARCHITECTURE], "num_labels": 1,
                                  "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id})


def load_reward_model(path, dtype=None, device="cpu") -> RewardModel:
    from ..checkpoint import load_pretrained
    from ..config import ModelConfig
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no reward model at {path}: train one with `dsv2 rm train`.")
    arch = json.loads(cfg_file.read_text()).get("architectures") or []
    if ARCHITECTURE not in arch:
        raise RewardModelError(f"{path} is not a reward model (its architectures are {arch}, not {ARCHITECTURE}): "
                               "train one with `dsv2 rm train`.")
    score = torch.empty(1, ModelConfig.from_json(path).hidden_size)
    backbone = load_pretrained(path, dtype=dtype, device=device, heads={"score.weight": score})
    return RewardModel(backbone, score.to(next(backbone.parameters()).dtype)).to(device).eval()


# ----------------------------------------------------------------- data
def pair_messages(row) -> tuple[tuple[list, list] | None, str | None]:
    """A JSONL row -> ((chosen messages, rejected messages), None) or (None, what is wrong)."""
    bad = (None, "a line needs 'prompt', 'chosen' and 'rejected' strings, or 'chosen' and 'rejected' conversations")
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        return bad
    c, r = row["chosen"], row["rejected"]
    if isinstance(c, str) and isinstance(r, str) and isinstance(row.get("prompt"), str):
        user = {"role": "user", "content": row["prompt"]}
        return ([user, {"role": "assistant", "content": c}], [user, {"role": "assistant", "content": r}]), None
    if isinstance(c, list) and isinstance(r, list) and c and r:
        return (c, r), None
    return bad


def read_pairs(path) -> tuple[list[tuple[list, list]], list[tuple[int, str]]]:
    return read_jsonl(path, pair_messages, "preference pair", '{"prompt": ..., "chosen": ..., "rejected": ...}')


def encode(tok: Tokenizer, messages: list[dict], seq_len: int) -> list[int]:
    return tok.encode_chat(tok.apply_chat_template(messages, add_generation_prompt=False))[:seq_len]


def batch_of(seqs: list[list[int]], pad_id: int):
    """Right-padded ids [B, T], each row's last index [B] and the real-token mask [B, T]."""
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        x[b, : len(s)] = torch.tensor(s)
    return x, lengths - 1, torch.arange(x.shape[1])[None] < lengths[:, None]


# -------------------------------------------------------------- training
@dataclass
class RMDataConfig:
    train: str = ""                     # JSONL preference pairs (see the module docstring)
    val: str | None = None              # held-out pairs: pairwise accuracy every eval_every
    seq_len: int = 2048                 # tokens per side; longer ones keep their start


@dataclass
class RMConfig(FinetuneConfig):
    data: RMDataConfig = field(default_factory=RMDataConfig)
    out_dir: str = "runs/rm"
    stage = "rm train"


class RMTrainer(FinetuneTrainer):
    """Bradley-Terry training of a RewardModel on the shared loop (batch.* counts pairs)."""
    name = "rm"
    baseline_name = "before training"
    val_name, val_unit, val_key = "pairwise accuracy", "", "val_pairwise_accuracy"
    result_key = "val_pairwise_accuracy"
    shown_extra = ("accuracy", "margin")

    def build_model(self, mcfg, device):
        return RewardModel(super().build_model(mcfg, device)).to(device).train()

    def build_data(self, dp_rank: int, dp_size: int) -> None:
        from ..data.loader import EpochOrder
        cfg, d = self.cfg, self.cfg.data
        if not d.train:
            raise ValueError("rm train needs preference pairs: add data.train=FILE.jsonl.")
        tok = self.load_tokenizer()
        pairs, bad = read_pairs(d.train)
        if self.is_main:
            report_skipped(d.train, bad)
        self.pairs = [(encode(tok, c, d.seq_len), encode(tok, r, d.seq_len)) for c, r in pairs]
        self.val_pairs = [(encode(tok, c, d.seq_len), encode(tok, r, d.seq_len)) for c, r in read_pairs(d.val)[0]] \
            if d.val else []
        self.train_data = EpochOrder(len(self.pairs), cfg.seed, dp_rank, dp_size)
        self.pad_id = tok.eos_id or 0

    def _scores(self, model, pairs, moe_hooks=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, last, valid = batch_of([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id)
        x, last = x.to(self.device), last.to(self.device)
        with self.autocast():
            r = model(x, last, moe_hooks=moe_hooks)
        return r[: len(pairs)], r[len(pairs):], valid.to(self.device)

    def train_step(self, step: int) -> dict:
        mb = self.cfg.batch.micro_batch
        lr = self.set_lr(step)
        n = self.schedule.seqs[step]
        total, correct, margin, aux_sum, tokens = 0.0, 0, 0.0, {}, 0
        for _ in range(n // mb):
            pairs = [self.pairs[self.train_data.next()[0]] for _ in range(mb)]
            rc, rr, valid = self._scores(self.step_model, pairs, self.rules)
            aux = self.rules.collect(*valid.shape, valid_BT=valid)
            loss = -F.logsigmoid(rc - rr).sum()
            (loss / n + sum(aux.values()) * (mb / n)).backward()
            total += loss.item()
            correct += int((rc > rr).sum())
            margin += float((rc - rr).detach().sum())
            tokens += int(valid.sum())
            for k, v in aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + v.item() * mb / n
        return {"lm_loss": total / n, "lr": lr, "grad_norm": self.optimizer_step(), "tokens": tokens,
                "aux": self.per_layer(aux_sum),
                "extra": {"accuracy": correct / n, "margin": margin / n}}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.val_pairs:
            return None
        self.step_model.eval()
        mb = self.cfg.batch.micro_batch
        correct = 0
        for s in range(0, len(self.val_pairs), mb):
            rc, rr, _ = self._scores(self.step_model, self.val_pairs[s:s + mb])
            correct += int((rc > rr).sum())
        self.step_model.train()
        return correct / len(self.val_pairs)

    def export(self) -> Path:
        path = self.out / "hf"
        save_reward_model(self.model, path, tokenizer_dir=self.tokenizer_dir)
        self.print(f"exported {path} (reward model: DeepseekV2ForSequenceClassification, num_labels 1)")
        return path


def load_rm_config(name_or_path: str, overrides: list[str] | None = None) -> RMConfig:
    from ..train.config import load_config
    return load_config(name_or_path, overrides, cls=RMConfig, presets=RM_PRESETS)


# -------------------------------------------------------- as a GRPO reward
class ModelReward:
    """A trained reward model as a reward function: scores each (prompt, completion) as a chat."""

    def __init__(self, path, batch: int = 16):
        from ..tokenizer import load_tokenizer
        self.rm = load_reward_model(path, dtype=torch.float32)
        self.tok = load_tokenizer(path, self.rm.config.vocab_size)
        self.batch, self.path = batch, path

    @torch.no_grad()
    def __call__(self, prompts, completions, **_) -> list[float]:
        seqs = []
        for p, c in zip(prompts, completions):
            text = p + c + (self.tok.eos_token or "")     # the rendered prompt, the answer, the turn's end
            seqs.append(self.tok.encode_chat(text))
        out: list[float] = []
        for s in range(0, len(seqs), self.batch):
            x, last, _ = batch_of(seqs[s:s + self.batch], self.tok.eos_id or 0)
            out += self.rm(x, last).tolist()
        return out
