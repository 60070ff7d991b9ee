"""`dsv2.LLM`: the offline Python API over the slot engine.

    from dsv2 import LLM
    llm = LLM("path/to/checkpoint")                      # tokenizer.json next to the weights is used
    [r] = llm.generate(["Hello"], max_new_tokens=32)     # r.text, r.token_ids, r.finish_reason
    for chunk in llm.stream("你好", temperature=0.8, seed=0):
        print(chunk, end="", flush=True)

Prompts are strings (tokenized, with BOS as the tokenizer config says) or lists of token ids.
Each generate() call sizes a fresh engine to its batch (the cache is per request batch), runs
up to `max_batch_slots` requests at once and admits the rest as slots free up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .engine import Engine, Request
from .sampling import SamplingParams


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None       # with generate(logprobs=n): per generated token
    top_logprobs: list[list[tuple[int, float]]] | None = None   # ... and its n most likely alternatives
    prompt_logprobs: list[tuple[float | None, list]] | None = None  # with prompt_logprobs=n: per prompt
                                                                    # token (logprob, top); the first (None, [])


class LLM:
    def __init__(self, path_or_model, tokenizer=None, dtype=None, max_batch_slots: int = 16,
                 max_len: int | None = None, compile: bool | None = None, quantize: str | None = None,
                 native: bool | None = None, kv_cache_dtype: str | None = None):
        from ..model import DeepseekV2
        from ..tokenizer import Tokenizer, load_tokenizer
        from ..dtypes import parse_dtype
        dtype = parse_dtype(dtype)
        if isinstance(path_or_model, DeepseekV2):
            from ..quant import quantize as quantize_model
            model = quantize_model(path_or_model if dtype is None else path_or_model.to(dtype), quantize)
            tok_dir = None
        elif isinstance(path_or_model, (str, Path)):
            from ..checkpoint import load_pretrained
            if not Path(path_or_model).is_dir():
                raise FileNotFoundError(f"no checkpoint directory at {path_or_model}: give a folder with "
                                        "config.json and safetensors weights.")
            from .memory import preflight
            preflight(path_or_model, dtype, quantize, max_len or 4096, max_batch_slots, kv_cache_dtype)
            model = load_pretrained(path_or_model, dtype=dtype, quantize=quantize)
            tok_dir = path_or_model if (Path(path_or_model) / "tokenizer.json").exists() else None
        else:
            raise ValueError(f"LLM takes a checkpoint directory or a DeepseekV2 model, got "
                             f"{type(path_or_model).__name__}.")
        self.model = model.eval()
        if tokenizer is None and tok_dir is not None:
            tokenizer = tok_dir
        if isinstance(tokenizer, (str, Path)):
            tokenizer = load_tokenizer(tokenizer, model.config.vocab_size)
        elif tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            raise ValueError("tokenizer must be a dsv2.Tokenizer or a directory holding tokenizer.json.")
        self.tokenizer = tokenizer
        self.max_batch_slots, self.max_len, self.compile, self.native = max_batch_slots, max_len, compile, native
        from .cache import check_kv_cache_dtype
        self.kv_cache_dtype = check_kv_cache_dtype(kv_cache_dtype)
        self.context = model.config.max_position_embeddings if max_len is None else max_len
        self.last_engine: Engine | None = None

    # --------------------------------------------------------------- prompts
    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass tokenizer=... to LLM or give token ids.")
            if not prompt:
                raise ValueError("the prompt is empty: give at least one character or token.")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)):
            return list(prompt)
        raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}.")

    def engine(self, slots: int, longest: int) -> Engine:
        """A fresh engine whose cache fits `slots` sequences of `longest` positions."""
        max_len = min(self.context, longest)
        eng = Engine(self.model, self.tokenizer, max_batch_slots=slots, max_len=max_len, compile=self.compile,
                     native=self.native, kv_cache_dtype=self.kv_cache_dtype)
        self.last_engine = eng
        return eng

    # ------------------------------------------------------------ generation
    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop=None,
                 ignore_eos: bool = False, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> list[Completion]:
        """Complete every prompt; results in prompt order. logprobs=n (0-20) also returns each
        generated token's log-probability under the model and the n most likely alternatives;
        prompt_logprobs=n the same for every prompt token (scoring a text)."""
        if isinstance(prompts, (str, torch.Tensor)) or (prompts and isinstance(prompts[0], int)):
            raise ValueError("generate takes a list of prompts; wrap a single prompt in a list or use stream().")
        params = SamplingParams.make(stop=stop, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos,
                                     logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        params.validate(self.model.config.vocab_size)
        ids = [self.encode(p) for p in prompts]
        if not ids:
            return []
        eng = self.engine(min(len(ids), self.max_batch_slots), max(map(len, ids)) + max_new_tokens)
        requests = [Request(p, params, id=i) for i, p in enumerate(ids)]
        for r in requests:
            eng.validate(r)  # every prompt checked before any work starts
        return run_requests(eng, requests, keep_text=self.tokenizer is not None)

    def stream(self, prompt, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop=None,
               ignore_eos: bool = False) -> Iterator[str]:
        """Yield text chunks as they are decoded; a chunk never splits a UTF-8 character."""
        if self.tokenizer is None:
            raise ValueError("stream() yields text and needs a tokenizer: pass tokenizer=... to LLM.")
        params = SamplingParams.make(stop=stop, max_new_tokens=max_new_tokens, temperature=temperature,
                                     top_k=top_k, top_p=top_p, seed=seed, ignore_eos=ignore_eos)
        params.validate(self.model.config.vocab_size)
        ids = self.encode(prompt)
        eng = self.engine(1, len(ids) + max_new_tokens)
        eng.add(Request(ids, params))
        while eng.seqs:
            for out in eng.step():
                if out.text:
                    yield out.text


def run_requests(eng: Engine, requests: list[Request], keep_text: bool = True) -> list[Completion]:
    """Run every request through `eng` (at most its slots at once, fresh prompts prefilled
    together); results in request order. Each request keeps its own sampling params (and seed)."""
    ids = [r.prompt_ids for r in requests]
    for i, r in enumerate(requests):
        r.id = i
    logprobs = any(r.params.logprobs is not None for r in requests)
    tokens: list[list[int]] = [[] for _ in ids]
    texts = [""] * len(ids)
    reasons: list[str | None] = [None] * len(ids)
    lps: list[list] = [[] for _ in ids]
    tops: list[list] = [[] for _ in ids]
    prompt_lps: list = [None] * len(ids)
    pending = iter(requests)
    nxt = next(pending, None)
    while nxt is not None or eng.seqs:
        batch = []
        while nxt is not None and len(batch) < eng.slots - len(eng.seqs):
            batch.append(nxt)
            nxt = next(pending, None)
        if batch:
            eng.add_many(batch)   # fresh prompts prefilled together
        for out in eng.step():
            tokens[out.request_id].append(out.token_id)
            texts[out.request_id] += out.text
            if out.prompt_logprobs is not None:
                prompt_lps[out.request_id] = out.prompt_logprobs
            if logprobs:
                lps[out.request_id].append(out.logprob)
                tops[out.request_id].append(out.top_logprobs)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
    if not keep_text:
        texts = [""] * len(ids)
    lps, tops = (lps, tops) if logprobs else ([None] * len(ids), [None] * len(ids))
    return [Completion(t, tok, r, len(p), lp, top, plp)
            for t, tok, r, p, lp, top, plp in zip(texts, tokens, reasons, ids, lps, tops, prompt_lps)]

