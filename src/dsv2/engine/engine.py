"""The slot-based generation engine: prefill into a latent cache, decode every active slot at once.

API (stable; the OpenAI-compatible server builds continuous batching on it)
--------------------------------------------------------------------------
    from dsv2.engine import Engine, Request, SamplingParams, StepOutput, EngineFull

    engine = Engine(model, tokenizer=None, max_batch_slots=8, max_len=None, compile=None,
                    prefill_chunk=2048)
        model: a DeepseekV2 in eval mode (its dtype is the cache's dtype). tokenizer: a
        dsv2.Tokenizer, needed only for stop strings and text deltas. max_len: positions per
        slot (default min(max_position_embeddings, 2048)). The LatentCache of
        [max_batch_slots, max_len, d_c] + [.., d_h^R] per layer is allocated here, per engine.
        compile: torch.compile the decode step (opt-in, see engine/decode.py; a one-line
        notice on stderr when it falls back to eager). prefill_chunk (default 2048): prompts
        longer than this are prefilled in chunks of this many tokens, bounding prefill memory.
        native: decode with the fused C step (native) - None: wherever it applies (CPU,
        a C compiler present); True: require it (ValueError saying why not); False: PyTorch ops.
        kv_cache_dtype: the cache's format - None/"auto" (the model's dtype), "bfloat16",
        "float32", "fp8", "int8" or "mixed" (~5.8 bits per element; engine/cache.py).

    slot = engine.add(Request(prompt_ids=[...], params=SamplingParams(...), id=None))
        Validates, takes a free slot (raises EngineFull when none is free; check
        engine.has_free_slot()), prefills the prompt (reusing the longest cached prefix a
        free slot still holds, e.g. the previous chat turn) and samples the first token.
        Bad input raises ValueError with one sentence: empty prompt, prompt not shorter than
        max_len, ids outside the vocabulary, bad sampling values. request.id defaults to a
        fresh int.

    outs = engine.step() -> list[StepOutput]
        One token for every request in a slot: a request added since the last step gets
        its first (prefill-sampled) token, every other one gets a token from ONE batched
        absorbed-MLA decode forward over all of them. StepOutput fields:
            request_id, slot, token_id (int), text (UTF-8-safe delta, "" without a
            tokenizer or while bytes/stop-string prefixes are held back),
            finished (bool), finish_reason ("stop" | "length" | None), and with
            SamplingParams(logprobs=n): logprob (the token's log-probability under the model)
            and top_logprobs ([(token id, logprob)] of the n most likely tokens), else None.
        A finished request frees its slot by itself (its cache rows stay readable for
        prefix reuse until the slot is taken again). Returns [] when nothing is active.

    engine.cancel(request_id) / engine.free(slot)
        Drop a request now (no further outputs for it); the slot becomes free.

    engine.active -> dict slot -> request id;  engine.has_free_slot();  engine.cache (LatentCache:
    bytes_per_token(), nbytes, capacity_tokens()).

The offline `dsv2.LLM.generate(prompts, ...)` and `LLM.stream(prompt, ...)` (engine/llm.py) run
on this same loop: add while a slot is free, step, collect.

Why slots: a slot is one cache row with its own length, so sequences of different lengths
decode together with no padding; a decode step writes each slot's new latent at its own
position and masks each slot to its own length. The fused CPU step decodes exactly the active
slots wherever they lie (it is given their slot numbers), so a lone request that reused a
cached prefix in a high slot costs one row. The PyTorch-op step decodes the contiguous row
range [0, highest active slot], a view of the cache (no gather), so free slots are taken lowest
first; there, rows in that range that are not decoding compute a throwaway token whose latent
write lands at their own next position, which the next real write overwrites.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..model.attention import KVStep
from ..model.mask import causal_mask
from .cache import LatentCache, bytes_per_token, common_prefix
from .memory import check_cache_fits
from .optimize import prefill_dtype, prepare_for_decode
from .sampling import SamplingParams, is_token_id, sample, token_logprobs
from .text import TextStream


# A batched prefill takes at most this many (padded) tokens in one forward.
BATCH_PREFILL_TOKENS = 4096


class EngineFull(RuntimeError):
    """No free slot: step() until a request finishes, or make an engine with more slots."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: int | str | None = None


@dataclass
class StepOutput:
    request_id: int | str
    slot: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None
    logprob: float | None = None          # with SamplingParams.logprobs: this token's logprob
    top_logprobs: list | None = None      # ... and [(token id, logprob)] of the most likely tokens
    prompt_logprobs: list | None = None   # with SamplingParams.prompt_logprobs, on a request's first
                                          # output: per prompt token (logprob, top); the first is (None, [])


@dataclass
class _Seq:
    """A request living in a slot."""
    request: Request
    generator: torch.Generator | None
    stream: TextStream | None
    stop_ids: frozenset
    last_token: int = -1
    last_logprobs: tuple | None = None   # (logprob, top) of last_token when the request asks for them
    prompt_logprobs: list | None = None  # handed out with the first output
    emitted: bool = False          # last_token has been handed out and awaits decoding
    n_generated: int = 0


class Engine:
    def __init__(self, model, tokenizer=None, max_batch_slots: int = 8, max_len: int | None = None,
                 compile: bool | None = None, prefill_chunk: int = 2048, native: bool | None = None,
                 kv_cache_dtype: str | None = None):
        cfg = model.config
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}.")
        self.prefill_chunk = prefill_chunk
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.max_len = min(cfg.max_position_embeddings, 2048) if max_len is None else max_len
        if self.max_len > cfg.max_position_embeddings:
            raise ValueError(f"max_len {self.max_len} exceeds the model's context "
                             f"(max_position_embeddings = {cfg.max_position_embeddings}).")
        dtype = self._weight_dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            check_cache_fits(max_batch_slots * self.max_len * bytes_per_token(cfg, kv_cache_dtype, dtype),
                             max_batch_slots, self.max_len)
        self.cache = LatentCache(cfg, max_batch_slots, self.max_len, dtype, self.device, kv_cache_dtype)
        self.slots = max_batch_slots
        self.seqs: dict[int, _Seq] = {}
        # Token ids whose latents a slot holds (kept after a request ends, for prefix reuse).
        self.cached_ids: list[list[int]] = [[] for _ in range(max_batch_slots)]
        self._ids = itertools.count()
        self._tokens = torch.zeros(max_batch_slots, 1, dtype=torch.long, device=self.device)
        self.eos_ids = {i for i in ([cfg.eos_token_id] if isinstance(cfg.eos_token_id, int)
                                    else cfg.eos_token_id or []) if i is not None}
        if tokenizer is not None and tokenizer.eos_id is not None:
            self.eos_ids.add(tokenizer.eos_id)
        from .decode import DecodeStep
        prepare_for_decode(model)
        self._decode = DecodeStep(model, compile, native)
        self._prefill_dtype = prefill_dtype(model)   # float32 for bf16 weights on a CPU slow at bf16

    # ----------------------------------------------------------------- admin
    @property
    def active(self) -> dict[int, int | str]:
        return {s: q.request.id for s, q in self.seqs.items()}

    def has_free_slot(self) -> bool:
        return len(self.seqs) < self.slots

    def free(self, slot: int) -> None:
        self.seqs.pop(slot, None)

    def cancel(self, request_id) -> bool:
        for s, q in list(self.seqs.items()):
            if q.request.id == request_id:
                self.free(s)
                return True
        return False

    # ------------------------------------------------------------------- add
    def validate(self, request: Request) -> None:
        ids, V = request.prompt_ids, self.cfg.vocab_size
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise ValueError("the prompt is empty: give at least one token (or non-empty text).")
        if not all(is_token_id(t, V) for t in ids):
            raise ValueError(f"prompt token ids must be ints in [0, {V}) for this model.")
        if len(ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens but the context holds {self.max_len}: "
                             f"shorten the prompt or raise max_len (model limit "
                             f"{self.cfg.max_position_embeddings}).")
        request.params.validate(V)
        if request.params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: pass one to the engine, or use stop token ids.")

    def add(self, request: Request) -> int:
        self.validate(request)
        if not self.has_free_slot():
            raise EngineFull(f"all {self.slots} slots are busy: call step() until one finishes.")
        slot, reuse = self._pick_slot(list(request.prompt_ids))
        self._add_at(slot, reuse, request)
        return slot

    def _add_at(self, slot: int, reuse: int, request: Request) -> None:
        ids, p = list(request.prompt_ids), request.params
        if p.prompt_logprobs is not None:
            reuse = 0  # every prompt position's logits are needed, cached ones too
        seq = self._new_seq(request)
        self.cached_ids[slot] = ids[:reuse]  # what the slot holds if the prefill fails part way
        logits, seq.prompt_logprobs = self._prefill(slot, ids[reuse:], reuse, p.prompt_logprobs)
        self._start(slot, seq, logits, ids)

    def add_many(self, requests: list[Request]) -> list[int]:
        """Add several requests at once -> their slots. Fresh prompts (no cached prefix to reuse,
        no prompt logprobs) landing in adjacent free slots are prefilled together, as one padded
        batch: on the project's CPU 16 prompts of 32 tokens took 2.9x less time that way than one
        by one, 7 of 71 tokens 1.7x less (`small` preset). The others are prefilled one by one.
        Every request is checked before any work; raises EngineFull if they do not all fit."""
        for r in requests:
            self.validate(r)
        if len(requests) > self.slots - len(self.seqs):
            raise EngineFull(f"{len(requests)} requests but {self.slots - len(self.seqs)} free slots.")
        placed: dict[int, tuple[int, Request]] = {}   # slot -> (reuse, request)
        slots = []
        for r in requests:
            slot, reuse = self._pick_slot(list(r.prompt_ids), taken=placed)
            placed[slot] = (reuse, r)
            slots.append(slot)
        fresh = sorted(s for s, (reuse, r) in placed.items()
                       if reuse == 0 and r.params.prompt_logprobs is None and len(r.prompt_ids) <= self.prefill_chunk)
        for s, (reuse, r) in placed.items():
            if s not in fresh:
                self._add_at(s, reuse, r)
        run: list[int] = []
        for s in fresh:  # each run of adjacent slots, up to BATCH_PREFILL_TOKENS padded tokens, is one forward
            longest = max(len(placed[t][1].prompt_ids) for t in run + [s])
            if run and (s != run[-1] + 1 or (len(run) + 1) * longest > BATCH_PREFILL_TOKENS):
                self._prefill_batch([(t, placed[t][1]) for t in run])
                run = []
            run.append(s)
        if run:
            self._prefill_batch([(t, placed[t][1]) for t in run])
        return slots

    def _new_seq(self, request: Request) -> _Seq:
        if request.id is None:
            request.id = next(self._ids)
        p = request.params
        return _Seq(request, None if p.greedy else p.generator(),
                    TextStream(self.tokenizer, p.stop) if self.tokenizer is not None else None,
                    frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(self.eos_ids)))

    def _start(self, slot: int, seq: _Seq, logits_1V: torch.Tensor, ids: list[int]) -> None:
        """Sample a prefilled request's first token and put it in its slot."""
        p = seq.request.params
        token = sample(logits_1V, [p], [seq.generator])
        seq.last_token = int(token[0])
        if p.logprobs is not None:
            seq.last_logprobs = token_logprobs(logits_1V, token, p.logprobs)[0]
        self.cached_ids[slot] = ids
        self.seqs[slot] = seq

    @torch.inference_mode()
    def _prefill_batch(self, items: list[tuple[int, Request]]) -> None:
        """Fresh prompts in adjacent slots, one forward: padded to the longest, each row causal
        over its own tokens. A row's pad positions write latents past its prompt, which its
        decode steps overwrite before any mask lets them be read."""
        if len(items) == 1:
            self._add_at(items[0][0], 0, items[0][1])
            return
        lo, B = items[0][0], len(items)
        prompts = [list(r.prompt_ids) for _, r in items]
        T = max(map(len, prompts))
        x = torch.tensor([p + [0] * (T - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        pos = torch.arange(T, device=self.device)[None].expand(B, -1)
        mask = causal_mask(pos, T) & (pos[:, None, :] < lens[:, None, None])   # causal, and no row's padding
        for (slot, _), p in zip(items, prompts):
            self.cached_ids[slot] = []
            self.cache.lengths[slot] = len(p)
        h = self.model.hidden_states(x, kv=self.cache.layers(slice(lo, lo + B)),
                                     step=KVStep(pos, T, mask), dtype=self._prefill_dtype)
        last = h[torch.arange(B, device=self.device), lens - 1][:, None].to(self._weight_dtype)
        logits = self.model.head(last)[:, 0].float()
        for i, ((slot, r), p) in enumerate(zip(items, prompts)):
            self._start(slot, self._new_seq(r), logits[i: i + 1], p)

    def _pick_slot(self, ids: list[int], taken=()) -> tuple[int, int]:
        """The lowest free slot, unless a free slot holds a longer prefix of `ids`. -> (slot, reuse)."""
        best, reuse = None, -1
        for s in range(self.slots):
            if s in self.seqs or s in taken:
                continue
            n = common_prefix(self.cached_ids[s], ids, limit=len(ids) - 1)
            if n > reuse:
                best, reuse = s, n
        return best, reuse

    @torch.inference_mode()
    def _prefill(self, slot: int, ids: list[int], start: int, n_top: int | None = None):
        """Write the latents of ids at positions [start, start+T) of `slot`.
        -> (last logits [1, V], and with n_top: [(logprob, top)] of every prompt token, else None).

        Long prompts go through in chunks of `prefill_chunk` tokens, each attending to the cache
        written so far: the naive path's decompressed keys and values (and the MoE's buffers)
        then scale with the chunk, not with the prompt."""
        scores = None if n_top is None else [(None, [])]  # the first token has no context to score it
        # Scoring needs every position's logits: fewer rows per chunk keep those ~64 MiB.
        size = self.prefill_chunk if scores is None else min(self.prefill_chunk, max(16, 2**24 // self.cfg.vocab_size))
        for c in range(0, len(ids), size):
            chunk, at = ids[c: c + size], start + c
            T = len(chunk)
            x = torch.tensor([chunk], dtype=torch.long, device=self.device)
            pos = torch.arange(at, at + T, device=self.device)[None]
            # A fresh prompt is plain causal attention (mask None lets SDPA use its causal kernel).
            mask = None if at == 0 else causal_mask(pos, at + T)
            step = KVStep(pos, at + T, mask)
            self.cache.lengths[slot] = at + T
            logits = self.model(x, kv=self.cache.layers(slice(slot, slot + 1)), step=step,
                                last_only=scores is None, dtype=self._prefill_dtype)
            if scores is not None:  # position t scores the prompt's token t + 1
                nxt = torch.tensor(ids[c + 1: c + 1 + T], device=self.device)
                scores += token_logprobs(logits[0, : len(nxt)], nxt, n_top)
        return logits[:, -1], scores

    # ------------------------------------------------------------------ step
    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        if not self.seqs:
            return []
        decoding = sorted(s for s, q in self.seqs.items() if q.emitted)
        if decoding:
            self._decode_slots(decoding)
        outs = []
        for s in sorted(self.seqs):
            out = self._emit(s, self.seqs[s])
            outs.append(out)
            if out.finished:
                self.free(s)
        return outs

    def _decode_slots(self, decoding: list[int]) -> None:
        hi = decoding[-1] + 1
        lengths = self.cache.lengths
        for s in decoding:
            self._tokens[s, 0] = self.seqs[s].last_token
        # Rows not decoding write at their own next position (overwritten before it is read),
        # kept inside the buffer; a free slot gives up its last cached token for that.
        pos = []
        for s in range(hi):
            p = lengths[s]
            if s not in self.seqs and p >= self.max_len:
                p = lengths[s] = self.max_len - 1
                del self.cached_ids[s][p:]
            pos.append(p)
        kv_len = max(lengths[s] for s in decoding) + 1
        logits = self._decode(self._tokens[:hi], pos, kv_len, self.cache, hi, decoding)   # the decoding rows' logits
        params = [self.seqs[s].request.params for s in decoding]
        gens = [self.seqs[s].generator for s in decoding]
        picked_B = sample(logits, params, gens)
        want = [i for i, p in enumerate(params) if p.logprobs is not None]
        if want:
            lps = token_logprobs(logits[want], picked_B[want], max(params[i].logprobs for i in want))
            for i, (c, top) in zip(want, lps):
                self.seqs[decoding[i]].last_logprobs = (c, top[: params[i].logprobs])
        for s, t in zip(decoding, picked_B.tolist()):
            q = self.seqs[s]
            self.cached_ids[s].append(q.last_token)
            lengths[s] += 1
            q.last_token, q.emitted = t, False

    def _emit(self, slot: int, q: _Seq) -> StepOutput:
        t = q.last_token
        q.emitted = True
        q.n_generated += 1
        text, reason = "", None
        if q.stream is not None and t not in q.stop_ids:
            text = q.stream.push(t)
            if q.stream.stopped:
                reason = "stop"
        if t in q.stop_ids:
            reason = "stop"
        elif reason is None and (q.n_generated >= q.request.params.max_new_tokens
                                 or self.cache.lengths[slot] >= self.max_len):
            reason = "length"
        if reason is not None and q.stream is not None:
            text += q.stream.finish()
        lp, top = q.last_logprobs if q.last_logprobs is not None else (None, None)
        prompt, q.prompt_logprobs = q.prompt_logprobs, None
        return StepOutput(q.request.id, slot, t, text, reason is not None, reason, lp, top, prompt)

