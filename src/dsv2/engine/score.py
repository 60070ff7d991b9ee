"""Scoring continuations through the latent cache: the engine's path for evaluation.

    scorer = Scorer(model)
    scorer.loglikelihood([(context_ids, continuation_ids), ...]) -> [(logprob, is_greedy), ...]

A multiple-choice question asks for log P(choice | context) for every choice. Written as K
separate forwards over context + choice (what lm-evaluation-harness's HF model does), the
context is computed K times. Here it is computed once:

1. the contexts of a batch of questions (all but their last token) are prefilled together
   into cache rows [0, G), one padded forward without the head;
2. each question's latents (c^KV and k^R, (d_c + d_h^R) numbers per token per layer) are
   copied into one cache row per choice;
3. every choice row runs [last context token] + choice[:-1] against its copy of the context,
   so its logits at step t predict choice token t: the same positions and the same attention
   a full forward over context + choice has, and the only tokens whose logits are taken.

A context longer than the model's window is cut from the left, keeping the last
`max_len + 1` tokens of context + continuation, as the harness does.
"""

from __future__ import annotations

import torch

from ..model.attention import KVStep
from ..model.mask import causal_mask
from .cache import LatentCache
from .optimize import prefill_dtype, prepare_for_decode
from .sampling import is_token_id

Pair = tuple[list[int], list[int]]   # (context ids, continuation ids)


class Scorer:
    def __init__(self, model, max_len: int | None = None, batch_tokens: int = 8192, max_rows: int = 64,
                 kv_cache_dtype: str | None = None):
        """max_len: the longest context + continuation scored (default: the model's context).
        batch_tokens, max_rows: a batch's padded (rows x length) and row count, bounding memory."""
        cfg = model.config
        self.model, self.cfg = model.eval(), cfg
        self.max_len = cfg.max_position_embeddings if max_len is None else max_len
        if self.max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {self.max_len} exceeds the model's context "
                             f"(max_position_embeddings = {cfg.max_position_embeddings}).")
        self.batch_tokens, self.max_rows = batch_tokens, max_rows
        self.kv_cache_dtype = kv_cache_dtype   # the cache's format (engine/cache.py); None: the model's dtype
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        prepare_for_decode(model)
        self._prefill_dtype = prefill_dtype(model)   # float32 for bf16 weights on a CPU slow at bf16

    def fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate so context + continuation is at most max_len + 1 tokens."""
        if not continuation:
            raise ValueError("a continuation to score is empty: give at least one token.")
        if len(continuation) > self.max_len:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the "
                             f"{self.max_len}-token window.")
        if not context:
            raise ValueError("a context is empty: start it with the BOS (or EOS) token.")
        keep = self.max_len + 1 - len(continuation)
        return context[-keep:], continuation

    @torch.inference_mode()
    def loglikelihood(self, pairs: list[Pair], progress=None) -> list[tuple[float, bool]]:
        """For each (context, continuation): (sum of log P(continuation tokens), every token greedy).
        Pairs whose (left-truncated) contexts are equal share one prefill, wherever they are in the list."""
        V = self.cfg.vocab_size
        by_ctx: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            for t in (*ctx, *cont):
                if not is_token_id(t, V):
                    raise ValueError(f"token ids must be ints in [0, {V}) for this model; got {t!r}.")
            c, t = self.fit(list(ctx), list(cont))
            by_ctx.setdefault(tuple(c), []).append((i, t))
        items = [(list(c), conts) for c, conts in by_ctx.items()]
        # Longest first: a batch's rows then pad to similar lengths.
        items.sort(key=lambda it: -(len(it[0]) + max(len(t) for _, t in it[1])))
        out: list = [None] * len(pairs)
        batch: list = []
        for ctx, conts in items:
            while len(conts) > self.max_rows:   # a context with more continuations than a batch holds
                self._run([(ctx, conts[: self.max_rows])], out, progress)
                conts = conts[self.max_rows:]
            it = (ctx, conts)
            if batch and not self._fits(batch + [it]):
                self._run(batch, out, progress)
                batch = []
            batch.append(it)
        if batch:
            self._run(batch, out, progress)
        return out

    def _fits(self, batch) -> bool:
        rows = sum(len(c) for _, c in batch)
        span = max(len(ctx) + max(len(t) for _, t in c) for ctx, c in batch)
        return rows <= self.max_rows and (len(batch) + rows) * span <= self.batch_tokens

    def _run(self, batch, out, progress) -> None:
        batch = sorted(batch, key=lambda it: -len(it[0]))
        G = len(batch)
        # Rows shortest first, so runs of similar lengths sit in adjacent cache rows (step 3).
        rows = sorted(((g, i, cont) for g, (_, conts) in enumerate(batch) for i, cont in conts),
                      key=lambda r: len(r[2]))
        R = len(rows)
        C = [len(ctx) for ctx, _ in batch]
        span = max(C) + len(rows[-1][2])
        cache = LatentCache(self.cfg, G + R, span, self.dtype, self.device, self.kv_cache_dtype)
        dev = self.device
        # 1. contexts without their last token into rows [0, G), longest first, padded within
        # runs of similar lengths
        for lo, hi in _runs([len(ctx) - 1 for ctx, _ in batch]):
            pre = len(batch[lo][0]) - 1
            if pre > 0:
                x = torch.tensor([ctx[:-1] + [0] * (pre - len(ctx) + 1) for ctx, _ in batch[lo:hi]], device=dev)
                pos = torch.arange(pre, device=dev)[None].expand(hi - lo, -1)
                self.model.hidden_states(x, kv=cache.layers(slice(lo, hi)),
                                         step=KVStep(pos, pre, causal_mask(pos, pre)), dtype=self._prefill_dtype)
        # 2. each row gets its question's latents
        for r, (g, _, _) in enumerate(rows):
            n = C[g] - 1
            if n:
                for joint in cache.joint:
                    joint[G + r, :n] = joint[g, :n]
        # 3. [last context token] + continuation[:-1] at positions C - 1 ..., in runs of rows of
        # similar lengths (sorted shortest first)
        for lo, hi in _runs([len(cont) for _, _, cont in rows]):
            self._score_rows(batch, rows[lo:hi], cache.layers(slice(G + lo, G + hi)), C, span, out)
        if progress is not None:
            progress.update(R)

    def _score_rows(self, batch, rows, kv, C, span, out) -> None:
        dev = self.device
        T = max(len(cont) for _, _, cont in rows)
        x = torch.tensor([[batch[g][0][-1]] + cont[:-1] + [0] * (T - len(cont)) for g, _, cont in rows], device=dev)
        start = torch.tensor([C[g] - 1 for g, _, _ in rows], device=dev)
        pos = start[:, None] + torch.arange(T, device=dev)[None]
        h = self.model.hidden_states(x, kv=kv, step=KVStep(pos, span, causal_mask(pos, span)), absorb=True,
                                     dtype=self._prefill_dtype)
        logits = self.model.head(h).float()
        logp = logits.log_softmax(-1)
        for r, (g, i, cont) in enumerate(rows):
            n = len(cont)
            target = torch.tensor(cont, device=dev)
            lp = logp[r, :n].gather(-1, target[:, None])[:, 0]
            greedy = bool((logits[r, :n].argmax(-1) == target).all())
            out[i] = (float(lp.double().sum()), greedy)


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Split sorted lengths into [lo, hi) runs padded to their longest with little waste: a run
    ends where the next length is over 1.5x (+8) its first. Padding costs as much as tokens;
    each extra forward costs a fixed ~5 ms per layer of small-op overhead on CPU."""
    out, lo = [], 0
    for i in range(1, len(lengths) + 1):
        if i == len(lengths) or max(lengths[i], lengths[lo]) > 1.5 * min(lengths[i], lengths[lo]) + 8:
            out.append((lo, i))
            lo = i
    return out

