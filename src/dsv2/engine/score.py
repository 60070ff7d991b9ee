"""Scoring continuations: the engine's path for evaluation.

    scorer = Scorer(model)
    scorer.loglikelihood([(context_ids, continuation_ids), ...]) -> [(logprob, is_greedy), ...]

A multiple-choice question asks for log P(choice | context) for every choice. Written as K
separate forwards over context + choice (what lm-evaluation-harness's HF model does), the
context is computed K times. Here each distinct context is computed once, as one sequence with
its choices:

    [context][choice 1 but its last token][choice 2 but its last token]...

under a tree mask (model/mask.py's branch_mask): the context is causal; each choice sees the
whole context and itself causally, never another choice, and its positions continue from the
end of the context. Every token so has exactly the positions and attention it has in a full
forward over context + choice. The context's last token predicts the first token of every
choice and a choice's token t its token t + 1: only those tokens go through the last layer's
FFN and the head.

Sequences are sorted by length and batched. A batch's tokens run packed into one row without
padding; attention alone runs them as padded rows (KVStep's layout, model/attention.py).
A context longer than the model's window is cut from the left, keeping the last `max_len + 1`
tokens of context + continuation, as the harness does. With `kv_cache_dtype` the latents go
through a latent cache of that format, so the scores include its rounding.
"""

from __future__ import annotations

import torch

from ..model.attention import KVStep
from ..model.mask import branch_mask
from .cache import LatentCache
from .optimize import prefill_dtype, prepare_for_decode
from .sampling import is_token_id

Pair = tuple[list[int], list[int]]   # (context ids, continuation ids)
Seq = tuple[list[int], list[tuple[int, list[int]]]]   # (context, [(pair index, continuation), ...])

# Logits held at once (tokens x vocab), 16 MiB in float32: small enough for the allocator to
# reuse the memory instead of mapping (and page-faulting) a fresh block for each chunk.
HEAD_CHUNK = 2 ** 22


class Scorer:
    def __init__(self, model, max_len: int | None = None, batch_tokens: int = 8192, max_rows: int = 64,
                 kv_cache_dtype: str | None = None):
        """max_len: the longest context + continuation scored (default: the model's context).
        batch_tokens, max_rows: a batch's sequences x its longest, and its sequence count, bounding memory."""
        cfg = model.config
        self.model, self.cfg = model.eval(), cfg
        self.max_len = cfg.max_position_embeddings if max_len is None else max_len
        if self.max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {self.max_len} exceeds the model's context "
                             f"(max_position_embeddings = {cfg.max_position_embeddings}).")
        self.batch_tokens, self.max_rows = batch_tokens, max_rows
        self.kv_cache_dtype = kv_cache_dtype   # the cache's format (engine/cache.py); None: no cache
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
        Pairs whose (left-truncated) contexts are equal share one sequence, wherever they are in the list."""
        V = self.cfg.vocab_size
        by_ctx: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            for t in (*ctx, *cont):
                if not is_token_id(t, V):
                    raise ValueError(f"token ids must be ints in [0, {V}) for this model; got {t!r}.")
            c, t = self.fit(list(ctx), list(cont))
            by_ctx.setdefault(tuple(c), []).append((i, t))
        # A context's continuations fill sequences of at most max_len tokens (one pair always fits).
        seqs: list[Seq] = []
        for ctx, conts in by_ctx.items():
            seqs.append((list(ctx), []))
            for i, cont in conts:
                if seqs[-1][1] and _seq_len(seqs[-1]) + len(cont) - 1 > self.max_len:
                    seqs.append((list(ctx), []))
                seqs[-1][1].append((i, cont))
        # Longest first: a batch's sequences have similar lengths, and the largest batch comes first.
        seqs.sort(key=lambda q: -_seq_len(q))
        out: list = [None] * len(pairs)
        batch: list[Seq] = []
        for seq in seqs:
            if batch and not self._fits(batch, seq):
                self._run(batch, out, progress)
                batch = []
            batch.append(seq)
        if batch:
            self._run(batch, out, progress)
        return out

    def _fits(self, batch: list[Seq], seq: Seq) -> bool:
        """Whether seq joins the batch: within the bounds, and not much shorter than the batch's
        first (longest) sequence, since attention runs every sequence padded to that length."""
        T = _seq_len(batch[0])
        return (len(batch) < self.max_rows and (len(batch) + 1) * T <= self.batch_tokens
                and T <= 1.25 * _seq_len(seq) + 16)

    def _run(self, batch: list[Seq], out, progress) -> None:
        """One forward over the batch: its N tokens packed into one row, attention over B rows of T."""
        dev = self.device
        T = _seq_len(batch[0])
        ids, pos, layout, slots, branch = [], [], [], [], []
        keep = []                # packed tokens whose final hidden states are needed
        scored, pred, pair, tgt = [], [], [], []   # pairs; per scored token: its predictor in `keep`, pair, target
        for b, (ctx, conts) in enumerate(batch):
            start, C = len(ids), len(ctx)
            last = start + C - 1     # the context's last token, as a packed index
            off = len(keep) - last   # packed index j of this sequence is keep[j + off]
            br = [0] * C
            ids += ctx
            pos += range(C)
            for k, (i, cont) in enumerate(conts, 1):
                n = len(cont) - 1
                # the context's last token predicts the first token, the choice's own tokens the rest
                pred += [last + off, *range(len(ids) + off, len(ids) + off + n)]
                pair += [len(scored)] * len(cont)
                tgt += cont
                scored.append(i)
                ids += cont[:-1]
                pos += range(C, C + n)
                br += [k] * n
            L = len(ids) - start
            keep += range(last, start + L)
            layout.append(list(range(start, start + L)) + [start] * (T - L))
            slots += range(b * T, b * T + L)
            branch.append(br + [-1] * (T - L))
        N = len(ids)
        x, pos = torch.tensor([ids], device=dev), torch.tensor([pos], device=dev)
        mask = branch_mask(torch.tensor(branch, device=dev))
        layout, slots = torch.tensor(layout, device=dev), torch.tensor(slots, device=dev)
        kv, step = None, KVStep(pos, N, mask, layout, slots)
        if self.kv_cache_dtype is not None:   # packed index = cache slot; RoPE still takes `pos`
            kv = LatentCache(self.cfg, 1, N, self.dtype, dev, self.kv_cache_dtype).layers()
            step = KVStep(torch.arange(N, device=dev)[None], N, mask, layout, slots)
        M = len(pred)
        tgt = torch.tensor(tgt, device=dev)
        lp = torch.empty(M, dtype=torch.float64, device=dev)
        miss = torch.empty(M, dtype=torch.long, device=dev)
        # The last layer's FFN runs only on the tokens whose logits are taken.
        h = self.model.hidden_states(x, pos, kv, step, dtype=self._prefill_dtype, rows=torch.tensor([keep], device=dev))
        h = h[0].index_select(0, torch.tensor(pred, device=dev))
        chunk = max(1, HEAD_CHUNK // self.cfg.vocab_size)   # bounds the logits held at once
        for lo in range(0, M, chunk):
            logits = self.model.head(h[None, lo:lo + chunk])[0].float()
            t = tgt[lo:lo + chunk]
            lp[lo:lo + chunk] = logits.gather(-1, t[:, None])[:, 0] - logits.logsumexp(-1)
            miss[lo:lo + chunk] = logits.argmax(-1) != t
        pair = torch.tensor(pair, device=dev)
        total = torch.zeros(len(scored), dtype=torch.float64, device=dev).index_add_(0, pair, lp)
        misses = torch.zeros(len(scored), dtype=torch.long, device=dev).index_add_(0, pair, miss)
        for i, ll, m in zip(scored, total.tolist(), misses.tolist()):
            out[i] = (ll, m == 0)
        if progress is not None:
            progress.update(len(scored))


def _seq_len(seq: Seq) -> int:
    """Tokens in a sequence: the context, then each continuation but its last token."""
    ctx, conts = seq
    return len(ctx) + sum(len(cont) - 1 for _, cont in conts)
