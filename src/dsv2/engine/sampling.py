"""Sampling parameters and the batched sampler.

Greedy rows take an argmax. Sampled rows follow the order measured fastest on CPU:
temperature, then top-k (a partial sort of k survivors, never a full sort of the vocabulary),
then top-p on the survivors, then one uniform draw per row from that request's own seeded generator
pushed through the cumulative distribution (searchsorted). A request's draws therefore
depend only on its seed, not on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def is_token_id(t, vocab_size: int) -> bool:
    """An int (not a bool) in [0, vocab_size): what every token id handed to the engine must be."""
    return not isinstance(t, bool) and isinstance(t, int) and 0 <= t < vocab_size

# With top_p but no top_k, only this many most likely tokens are considered: the mass past
# the 1024th token of a language model's distribution is negligible and a full sort is slow.
TOP_P_CANDIDATES = 1024
# The most alternatives a request may ask logprobs for (OpenAI's limit for top_logprobs).
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 is greedy. stop_token_ids end generation when produced (the token is kept
    in token_ids, not in text); stop strings end it when the text contains them (the text is
    cut before the string). The model's EOS always stops unless ignore_eos.
    """
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None   # None: none; n >= 0: each token's logprob and the n most likely
    prompt_logprobs: int | None = None   # the same for the prompt's tokens (scoring, OpenAI's echo)

    @classmethod
    def make(cls, stop=None, **kw) -> "SamplingParams":
        """Build from user arguments; `stop` may mix strings (stop strings) and ints (token ids)."""
        strings, ids = [], list(kw.pop("stop_token_ids", None) or [])
        for s in ([] if stop is None else [stop] if isinstance(stop, (str, int)) else stop):
            if isinstance(s, bool) or not isinstance(s, (str, int)):
                raise ValueError(f"stop entries must be strings or token ids (int), got {type(s).__name__} "
                                 f"{s!r}.")
            (strings if isinstance(s, str) else ids).append(s)
        return cls(stop=strings, stop_token_ids=ids, **kw)

    def validate(self, vocab_size: int) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}.")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}.")
        if self.top_p is not None and not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}.")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {n!r}.")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}.")
        for t in self.stop_token_ids:
            if not is_token_id(t, vocab_size):
                raise ValueError(f"stop token ids must be ints in [0, {vocab_size}), got {t!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator().manual_seed(seed)


def sample(logits_BV: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row of logits_BV ([B, V], float32) -> [B] int64."""
    tokens_B = logits_BV.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens_B
    ps = [params[i] for i in rows]
    V = logits_BV.shape[-1]
    dev = logits_BV.device  # helper tensors live with the logits (GPU models); generators stay on CPU
    x = logits_BV[rows] / torch.tensor([p.temperature for p in ps], dtype=logits_BV.dtype, device=dev)[:, None]
    ks = [min(p.top_k or (TOP_P_CANDIDATES if p.top_p is not None else V), V) for p in ps]
    k = max(ks)
    nucleus = any(p.top_p is not None and p.top_p < 1 for p in ps)
    if k < V or nucleus:  # top_p needs the survivors sorted
        vals, idx = x.topk(k, dim=-1)
        if min(ks) < k:  # rows with a smaller top_k mask their tail
            keep = torch.arange(k, device=dev)[None] < torch.tensor(ks, device=dev)[:, None]
            vals = vals.masked_fill(~keep, float("-inf"))
    else:
        vals, idx = x, None
    probs = vals.softmax(dim=-1)
    if nucleus:
        # top-k output is sorted, so the nucleus is a prefix: drop tokens whose preceding mass
        # already reaches top_p (the first token always stays).
        top_p = torch.tensor([p.top_p if p.top_p is not None else 1.0 for p in ps], device=dev)[:, None]
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    cdf = probs.cumsum(dim=-1)
    u = torch.stack([torch.rand((), generator=generators[i]) for i in rows]).to(dev) * cdf[:, -1]
    j = torch.searchsorted(cdf, u[:, None]).clamp_(max=cdf.shape[-1] - 1)
    picked = j[:, 0] if idx is None else idx.gather(1, j)[:, 0]
    tokens_B[rows] = picked
    return tokens_B


def token_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor, n_top: int) -> list[tuple[float, list]]:
    """Per row: (log-probability of tokens_B[row], [(token id, logprob)] of the n_top most likely).

    Log-probabilities are the model's own distribution (log-softmax of the float32 logits),
    before temperature, top-k and top-p: what a token costs under the model, whichever way
    it was drawn."""
    lp = logits_BV.float().log_softmax(dim=-1)
    chosen = lp.gather(1, tokens_B.to(lp.device)[:, None])[:, 0].tolist()
    if n_top == 0:
        return [(c, []) for c in chosen]
    vals, idx = lp.topk(n_top, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, idx.tolist(), vals.tolist())]
