"""Rollouts for RL: G sampled completions per prompt from the live policy, through dsv2's engine,
and the sampled tokens' log-probs under a model by a plain training forward.

The engine runs the policy's own parameters (no copy; eval mode and no grad while sampling):
latent cache, continuous batching over every prompt x G request, and one seed per request,
derived from (run seed, step, output index), so a resumed run samples what a straight run
would have. Log-probs for the objective come from `completion_logprobs`, the training
forward; the engine's own log-probs of the same tokens agree with it (tested within 1e-4 in
float32), so either side can be trusted to score what the other sampled.

Shapes: B outputs, L = longest prompt + completion, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from ..engine.engine import Engine, Request
from ..engine.llm import run_requests
from ..engine.sampling import SamplingParams
from ..model.loss import lm_head_token_logprobs


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]          # per output (each prompt repeated G times, group after group)
    completion_ids: list[list[int]]      # the sampled tokens, EOS included when it was sampled
    texts: list[str]
    finish_reasons: list[str]
    seconds: float
    logprobs: list[list[float]] | None = None   # the engine's, when params ask for logprobs

    @property
    def tokens(self) -> int:
        return sum(map(len, self.completion_ids))


def request_seed(seed: int, step: int, index: int) -> int:
    return (seed * 1_000_003 + step) * 100_003 + index


@torch.no_grad()
def rollout(model, tokenizer, prompt_ids: list[list[int]], group_size: int, params: SamplingParams,
            seed: int = 0, step: int = 0, slots: int = 64) -> Rollouts:
    """group_size completions of every prompt, sampled with `params` (each output its own seed)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        reqs = [Request(p, dataclasses.replace(params, seed=request_seed(seed, step, i * group_size + g)))
                for i, p in enumerate(prompt_ids) for g in range(group_size)]
        longest = max(map(len, prompt_ids)) + params.max_new_tokens
        eng = Engine(model, tokenizer, max_batch_slots=min(len(reqs), slots), max_len=longest, native=False)
        for r in reqs:
            eng.validate(r)
        outs = run_requests(eng, reqs)
    finally:
        model.train(was_training)
    return Rollouts([r.prompt_ids for r in reqs], [o.token_ids for o in outs], [o.text for o in outs],
                    [o.finish_reason for o in outs], time.perf_counter() - t0,
                    [o.logprobs for o in outs] if params.logprobs is not None else None)


def pack_sequences(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int = 0):
    """-> input_ids [B, L-1], targets [B, L-1], mask [B, L-1] (1 where the target is a completion token),
    valid [B, L-1] (not padding). Position j predicts token j + 1 of prompt + completion."""
    seqs = [p + c for p, c in zip(prompt_ids, completion_ids)]
    L = max(map(len, seqs))
    B = len(seqs)
    full = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros(B, L - 1, dtype=torch.bool)
    valid = torch.zeros(B, L - 1, dtype=torch.bool)
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        full[b, : len(p) + len(c)] = torch.tensor(p + c)
        mask[b, len(p) - 1: len(p) + len(c) - 1] = True
        valid[b, : len(p) + len(c) - 1] = True
    return full[:, :-1], full[:, 1:], mask, valid


def completion_logprobs(model, input_ids: torch.Tensor, targets: torch.Tensor, with_entropy: bool = False,
                        temperature: float = 1.0, moe_hooks=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(target_t | prefix) [B, T] in float32 (with grad if enabled), and the policy's
    entropy at each position [B, T] (no grad) if asked. Right padding never affects real
    positions (causal attention). With a sampling temperature T the policy is softmax(logits / T),
    the distribution the rollouts were drawn from (as TRL does). The head runs by chunks
    (model/loss.py): the [B, T, vocab] logits are never held at once. moe_hooks: the trainer's
    MoE rules, in training forwards (model/moe.py)."""
    h = model.hidden_states(input_ids, moe_hooks=moe_hooks)                               # [B, T, D]
    B, T, D = h.shape
    logp, ent = lm_head_token_logprobs(h.reshape(B * T, D), model.lm_head.weight, targets.reshape(-1),
                                       temperature, with_entropy)
    return logp.view(B, T), None if ent is None else ent.view(B, T)
