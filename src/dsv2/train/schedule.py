"""The learning-rate and batch-size schedules, planned up front so the step line can say step i/N and an ETA.

Batch size (sequences per optimizer step) ramps linearly from `batch.start` to
`batch.final` over `batch.ramp_tokens` tokens, rounded down to whole micro-batches
(DeepSeek-V2: 2304 -> 9216 sequences over the first 225B tokens). The learning rate warms
up linearly over `optim.warmup_steps`, then is multiplied by `decay_factor` (0.316) once the
tokens seen pass each fraction in `decay_at` (0.6 and 0.9 of all training tokens). That
is `optim.schedule: step`; fine-tuning usually takes `cosine` (from lr down to
min_lr_factor x lr over the steps after warmup) or `constant`.

Everything is a pure function of the step index, so resuming needs only the step.
"""

from __future__ import annotations

import math

from .config import TrainConfig


class Schedule:
    def __init__(self, cfg: TrainConfig):
        b, o = cfg.batch, cfg.optim
        self.seq_len = cfg.data.seq_len
        self.seqs: list[int] = []          # sequences in step i
        self.tokens_before: list[int] = []  # tokens trained on before step i
        tokens = 0
        for _ in range(cfg.steps):
            frac = 1.0 if b.ramp_tokens <= 0 else min(1.0, tokens / b.ramp_tokens)
            if b.ramp_tokens <= 0:
                n = b.final
            else:
                n = b.start + (b.final - b.start) * frac
                n = max(b.micro_batch, int(n) // b.micro_batch * b.micro_batch)
            self.seqs.append(n)
            self.tokens_before.append(tokens)
            tokens += n * self.seq_len
        self.total_tokens = tokens
        self.peak_lr, self.warmup = o.lr, o.warmup_steps
        self.decay_at, self.decay_factor = sorted(o.decay_at), o.decay_factor
        self.kind, self.min_factor = o.schedule, o.min_lr_factor

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak_lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return self.peak_lr
        if self.kind == "cosine":
            t = (step - self.warmup) / max(1, len(self.seqs) - 1 - self.warmup)
            return self.peak_lr * (self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t)))
        seen = self.tokens_before[step] / max(1, self.total_tokens)
        return self.peak_lr * self.decay_factor ** sum(seen >= f for f in self.decay_at)

    def __len__(self) -> int:
        return len(self.seqs)
