"""`dsv2 grpo`: GRPO on the pretraining loop's machinery (checkpoints, resume, metrics, plots).

    dsv2 grpo --config demo init_from=runs/demo/sft/hf data.train=prompts.jsonl data.val=held_out.jsonl
    dsv2 grpo --config deepseek-v2 init_from=CKPT data.train=math.jsonl grpo.rewards='{exact_match: 1.0}'
    dsv2 grpo --config my.yaml --resume auto

One step (`GRPOTrainer.train_step`):
1. N = batch.final / grpo.group_size prompts in a seeded, resumable order;
2. G completions each from the live policy through the engine (align/rollout.py);
3. rewards: the weighted sum of the configured functions (align/rewards.py), then the
   group-relative advantages (align/grpo.py);
4. the sampled tokens' log-probs under the policy before the update (pi_old) and under the
   frozen reference (skipped when beta = 0);
5. mu optimizer steps on the clipped objective minus beta x KL, micro-batch by micro-batch,
   each micro-batch weighted by its share of the batch's normaliser (outputs or tokens);
6. iterative GRPO: every grpo.ref_update_every steps the reference becomes the policy.
Logged: the loss, the reward's mean and std (and per function), frac_reward_zero_std (groups
whose G rewards are all equal, which teach nothing), kl, clip_ratio, entropy, completion
lengths, and the tokens/s of rollouts and of updates. Every eval_every steps the held-out
prompts (data.val) are answered greedily and scored by grpo.eval_reward.

A prompts file holds one JSON object per line: {"prompt": "..."} or {"messages": [...]}
(rendered with the chat template's generation prompt) plus any columns the rewards read
(e.g. "answer"). GRPO runs on one process for now.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError
from ..data.loader import EpochOrder
from ..engine.sampling import SamplingParams
from .conversations import generation_prompt_ids, read_jsonl, report_skipped
from .finetune import PRESETS, FinetuneConfig, FinetuneTrainer
from .grpo import AGGS, SCALES, group_advantages, grpo_loss, process_advantages
from .rewards import RewardError, Rewards, resolve
from .rollout import completion_logprobs, pack_sequences, rollout

GRPO_PRESETS = PRESETS / "grpo"


@dataclass
class GRPODataConfig:
    train: str = ""                     # JSONL prompts: {"prompt": ...} or {"messages": [...]}, plus reward columns
    val: str | None = None              # held-out prompts, answered greedily every eval_every (null: none)
    chat: bool = True                   # render prompts with the chat template's generation prompt
    seq_len: int = 1024                 # prompt + completion tokens, for the FLOPs estimate


@dataclass
class GRPOSettings:
    group_size: int = 8                 # G: outputs sampled per prompt; batch.final (outputs per step) = N prompts x G
    max_new_tokens: int = 256           # completion length cap
    temperature: float = 1.0            # rollouts sample softmax(logits / T); the objective's log-probs use the same T
    top_k: int | None = None
    top_p: float | None = None
    stop: list = field(default_factory=list)   # stop strings ending a completion
    beta: float = 0.04                  # KL weight (k3 estimator); 0 skips the reference model
    eps_low: float = 0.2                # clip: rho in [1 - eps_low, 1 + eps_high]
    eps_high: float | None = None       # null: eps_low (DAPO's clip-higher: e.g. 0.28)
    agg: str = "grpo"                   # grpo (mean per output, then over outputs), token, constant
    scale: str = "group"                # advantage scale: group std, batch std, none (mean-centring only)
    mu: int = 1                         # optimizer steps per batch of rollouts
    ref_update_every: int = 0           # iterative GRPO: reference <- policy every this many steps (0: never)
    rewards: dict = field(default_factory=lambda: {"exact_match": 1.0})   # name or module:function -> weight
    process_reward: str | None = None   # process supervision: a function giving one reward per line (step) of
                                        # each completion; advantages are then per token (see grpo.py), not per output
    eval_reward: str = "exact_match"    # what the held-out greedy answers are scored by
    eval_also: list = field(default_factory=list)   # more held-out scores logged beside it (stage 1's metric in stage 2)
    rollout_slots: int = 64             # engine slots while sampling


@dataclass
class GRPOConfig(FinetuneConfig):
    data: GRPODataConfig = field(default_factory=GRPODataConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    out_dir: str = "runs/grpo"
    stage = "grpo"

    def validate(self) -> None:
        g, b = self.grpo, self.batch
        if g.agg not in AGGS:
            raise ConfigError(f"training config 'grpo.agg' is invalid: use {', '.join(AGGS)}.")
        if g.scale not in SCALES:
            raise ConfigError(f"training config 'grpo.scale' is invalid: use {', '.join(SCALES)}.")
        if not g.temperature > 0:
            raise ConfigError("training config 'grpo.temperature' must be > 0: GRPO learns from differences "
                              "between sampled outputs (greedy rollouts would all be the same).")
        if g.group_size < 2 or g.mu < 1:
            raise ConfigError("training config 'grpo' is invalid: group_size >= 2 and mu >= 1.")
        if b.final % g.group_size:
            raise ConfigError(f"the batch of batch.final={b.final} outputs does not split into groups of "
                              f"grpo.group_size={g.group_size}: make batch.final a multiple of the group size "
                              "(prompts per step x group size).")
        b.start, b.ramp_tokens = b.final, 0       # no batch-size ramp in RL
        super().validate()

    @property
    def prompts_per_step(self) -> int:
        return self.batch.final // self.grpo.group_size


def read_prompts(path: str | Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """Rows with "prompt" (a string) or "messages" (a list); bad lines listed with their numbers."""
    def parse(row):
        if isinstance(row, dict) and (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)):
            return row, None
        return None, "a line needs a string 'prompt' or a list of 'messages'"
    return read_jsonl(path, parse, "prompts", '{"prompt": ...} or {"messages": [...]}')


class GRPOTrainer(FinetuneTrainer):
    name = "grpo"
    baseline_name = "before RL"
    val_name, val_unit, val_key = "held-out score", "", "val_score"
    result_key = "val_score"
    shown_extra = ("reward", "reward_std", "frac_reward_zero_std", "kl", "clip_ratio", "completion_len")

    def __init__(self, cfg: GRPOConfig, rewards: Rewards | None = None, **seams):
        self._rewards = rewards
        super().__init__(cfg, **seams)
        if seams.get("dp_size", 1) > 1:
            raise ValueError("dsv2 grpo runs on one process for now: leave out --nproc / torchrun.")

    # --------------------------------------------------------------- setup
    def build_data(self, dp_rank: int, dp_size: int) -> None:
        cfg, d = self.cfg, self.cfg.data
        if not d.train:
            raise ValueError("grpo needs prompts: add data.train=FILE.jsonl.")
        tok = self.load_tokenizer()
        self.prompts, bad = read_prompts(d.train)
        if self.is_main:
            report_skipped(d.train, bad)
        self.val_prompts = read_prompts(d.val)[0] if d.val else []
        # encoded (and decoded back, for the reward functions) once; steps and evaluations reuse them
        self.prompt_ids = [self.encode(r) for r in self.prompts]
        self.prompt_texts = [tok.decode(p) for p in self.prompt_ids]
        self.val_prompt_ids = [self.encode(r) for r in self.val_prompts]
        self.order = self.train_data = EpochOrder(len(self.prompts), cfg.seed, dp_rank, dp_size)   # checkpointed
        self.rewards = self._rewards or Rewards(cfg.grpo.rewards)
        self.eval_rewards = {n: resolve(n) for n in [cfg.grpo.eval_reward, *cfg.grpo.eval_also]}
        self.process_reward = resolve(cfg.grpo.process_reward) if cfg.grpo.process_reward else None
        self.val_scores: dict[str, float] = {}
        g = cfg.grpo
        self.params = SamplingParams.make(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                                          top_p=g.top_p, stop=g.stop or None)
        self.ref = None
        if g.beta:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.pad_id = tok.eos_id or 0

    def encode(self, row: dict) -> list[int]:
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        if self.cfg.data.chat:
            return generation_prompt_ids(self.tokenizer, messages)
        return self.tokenizer.encode(row.get("prompt") or messages[-1]["content"])

    def stateful(self) -> dict:
        state = super().stateful()
        if self.ref is not None and self.cfg.grpo.ref_update_every:
            state["ref"] = self.ref          # iterative GRPO: the reference moves
        return state

    # ---------------------------------------------------------------- step
    def train_step(self, step: int) -> dict:
        cfg, g = self.cfg, self.cfg.grpo
        lr = self.set_lr(step)
        picks = [self.order.next()[0] for _ in range(cfg.prompts_per_step)]
        ro = rollout(self.model, self.tokenizer, [self.prompt_ids[i] for i in picks], g.group_size, self.params,
                     cfg.seed, step, g.rollout_slots)
        G, B = g.group_size, len(ro.texts)
        prompts_text = [self.prompt_texts[i] for i in picks for _ in range(G)]
        columns = reward_columns([self.prompts[i] for i in picks], G)
        total, per_fn = self.rewards(prompts_text, ro.texts, columns)
        rewards = torch.tensor(total)
        x, y, mask, valid = pack_sequences(ro.prompt_ids, ro.completion_ids, self.pad_id)
        if self.process_reward is None:
            adv = group_advantages(rewards, G, g.scale)
        else:
            adv = self._process_advantages(prompts_text, ro, columns, mask)
        x, y, mask, valid, adv = (t.to(self.device) for t in (x, y, mask, valid, adv))
        mb = cfg.batch.micro_batch
        slices = [slice(s, s + mb) for s in range(0, B, mb)]
        with torch.no_grad(), self.autocast():
            T = g.temperature
            old = torch.cat([completion_logprobs(self.model, x[s], y[s], temperature=T)[0] for s in slices]) \
                if g.mu > 1 else None
            ref = torch.cat([completion_logprobs(self.ref, x[s], y[s], temperature=T)[0] for s in slices]) \
                if self.ref else None
        n_tok = mask.sum()
        t0 = time.perf_counter()
        stats, loss_sum, aux_sum = {"kl": 0.0, "clip_ratio": 0.0, "entropy": 0.0}, 0.0, {}
        for _ in range(g.mu):
            for s in slices:
                self.rules.begin(torch.arange(s.start, min(s.stop, B)))
                with self.autocast():
                    logp, ent = completion_logprobs(self.step_model, x[s], y[s], with_entropy=True,
                                                    temperature=g.temperature, moe_hooks=self.rules)
                aux = self.rules.collect(*x[s].shape, valid_BT=valid[s])
                loss, st = grpo_loss(logp, logp.detach() if old is None else old[s], None if ref is None else ref[s],
                                     adv[s], mask[s], g.eps_low, g.eps_high, g.beta, g.agg, g.max_new_tokens,
                                     return_stats=True)
                share = (mask[s].sum() / n_tok) if g.agg == "token" else (mask[s].shape[0] / B)
                (loss * share + sum(aux.values()) * (mask[s].shape[0] / B)).backward()
                loss_sum += loss.item() * float(share) / g.mu
                st["entropy"] = float((ent * mask[s]).sum() / mask[s].sum().clamp(min=1))
                w = float(mask[s].sum() / n_tok) / g.mu        # this micro-batch's share of the step's tokens
                for k in stats:
                    stats[k] += w * st[k]
                for k, v in aux.items():
                    aux_sum[k] = aux_sum.get(k, 0.0) + v.item() * (mask[s].shape[0] / B) / g.mu
            grad_norm = self.optimizer_step()
        update_s = time.perf_counter() - t0
        if self.ref is not None and g.ref_update_every and (step + 1) % g.ref_update_every == 0:
            self.ref.load_state_dict(self.model.state_dict())
        r_NG = rewards.view(-1, G)
        lengths = [len(c) for c in ro.completion_ids]
        extra = {"reward": float(rewards.mean()), "reward_std": float(rewards.std()),
                 **{f"reward/{k}": sum(v) / len(v) for k, v in per_fn.items()},
                 **{f"reward_std/{k}": float(torch.tensor(v).std()) for k, v in per_fn.items()},
                 "frac_reward_zero_std": float((r_NG.std(1) == 0).float().mean()), **stats,
                 "completion_len": sum(lengths) / len(lengths),
                 "stopped": sum(r == "stop" for r in ro.finish_reasons) / B,
                 "rollout_tokens_per_s": ro.tokens / max(ro.seconds, 1e-9),
                 "update_tokens_per_s": g.mu * int(valid.sum()) / max(update_s, 1e-9)}
        return {"lm_loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens": int(valid.sum()),
                "aux": self.per_layer(aux_sum), "extra": extra}

    def _process_advantages(self, prompts, ro, columns, mask) -> torch.Tensor:
        """Per-token advantages [B, L-1] from one reward per line of each completion."""
        steps = self.process_reward(prompts, ro.texts, **columns)
        if steps is None or len(steps) != len(ro.texts) or any(not isinstance(r, (list, tuple)) for r in steps):
            raise RewardError(f"process reward {self.cfg.grpo.process_reward!r} must return one list of step rewards "
                              f"per completion ({len(ro.texts)} completions).")
        ends = [step_ends(self.tokenizer, c, len(r)) for c, r in zip(ro.completion_ids, steps)]
        longest = max(map(len, ro.completion_ids))
        per_token = process_advantages([[float(v) for v in r] for r in steps], ends, self.cfg.grpo.group_size, longest)
        adv = torch.zeros(mask.shape)
        for b, c in enumerate(ro.completion_ids):
            adv[b, mask[b]] = per_token[b, : len(c)]
        return adv

    # ---------------------------------------------------------------- eval
    def evaluate(self) -> float | None:
        """Held-out greedy score: data.val's prompts answered at temperature 0, scored by grpo.eval_reward
        (and by each of grpo.eval_also, kept in val_scores and logged as val/<name>)."""
        if not self.val_prompts:
            return None
        g = self.cfg.grpo
        self.val_scores = held_out_scores(self.model, self.tokenizer, self.val_prompts, self.val_prompt_ids,
                                          self.eval_rewards, g.max_new_tokens, g.stop)
        return self.val_scores[g.eval_reward]

    def val_extra(self) -> dict:
        return {f"val/{k}": v for k, v in self.val_scores.items() if k != self.cfg.grpo.eval_reward}


def step_ends(tokenizer, completion_ids: list[int], n_steps: int) -> list[int]:
    """The token index where each of n_steps lines of a completion ends: the token holding the
    line's newline; the last step, and any step past the last newline, end at the last token."""
    newlines = [i for i, t in enumerate(completion_ids) for _ in range(tokenizer.token_bytes(t).count(b"\n"))]
    last = len(completion_ids) - 1
    ends = newlines[: max(0, n_steps - 1)]
    return ends + [last] * (n_steps - len(ends))


def reward_columns(rows: list[dict], repeat: int = 1) -> dict[str, list]:
    """The prompt rows' other fields (e.g. answer), as the reward functions take them: one value
    per completion, each row's repeated for its `repeat` outputs."""
    return {k: [r.get(k) for r in rows for _ in range(repeat)] for k in rows[0] if k not in ("prompt", "messages")}


def held_out_scores(model, tokenizer, rows: list[dict], prompt_ids: list[list[int]], rewards: dict,
                    max_new_tokens: int, stop: list | None = None) -> dict[str, float]:
    """Greedy completions of every prompt, scored by each reward function: {name: mean score}."""
    params = SamplingParams.make(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop or None)
    ro = rollout(model, tokenizer, prompt_ids, 1, params)
    columns = reward_columns(rows)
    prompts = [tokenizer.decode(p) for p in prompt_ids]
    out = {}
    for name, fn in rewards.items():
        scores = fn(prompts, [t.strip() for t in ro.texts], **columns)
        out[name] = sum(0.0 if s is None or not math.isfinite(s) else s for s in scores) / len(scores)
    return out


def load_grpo_config(name_or_path: str, overrides: list[str] | None = None) -> GRPOConfig:
    from ..train.config import load_config
    return load_config(name_or_path, overrides, cls=GRPOConfig, presets=GRPO_PRESETS)
