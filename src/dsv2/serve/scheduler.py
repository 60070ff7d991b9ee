"""Continuous batching: one engine thread admits, steps and retires requests.

The HTTP handlers run on the asyncio event loop; the engine's forwards block for
milliseconds to seconds, so the engine lives on its own thread and the two talk through
a lock-guarded waiting queue (loop -> engine) and `loop.call_soon_threadsafe` (engine ->
loop). Each turn of the engine thread:

  1. frees the slots of cancelled requests (their clients went away);
  2. admits waiting requests, oldest first, while the engine has a free slot and this
     turn's prefill budget (prompt tokens) lasts;
  3. runs one engine step: one batched decode forward over every active slot;
  4. hands each request its new text; finished ones (EOS, stop string, max_tokens) have
     already given their slot back inside the engine.

So a new request joins the running batch at the next step instead of waiting for the
batch to drain, and a finished one gives its slot back at once. The waiting queue is
bounded: `submit` raises QueueFull (429) instead of letting latency grow without end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..engine.engine import Request
from ..engine.sampling import SamplingParams
from .metrics import Metrics

log = logging.getLogger("dsv2.serve")


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One sequence to generate. Events go to `events` (an asyncio.Queue on `loop`) as dicts:
    {"index", "text"} per token, and a last one with "finish_reason" and "completion_tokens";
    with logprobs asked for, every token's event also has "lp": (token id, logprob, top), and with
    prompt logprobs the first event has "prompt_lp": [(token id, logprob or None, top)]."""
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    index: int = 0
    id: int = field(default_factory=itertools.count().__next__)
    # Engine-thread state.
    n_generated: int = 0
    finish_reason: str | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_last: float | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Scheduler:
    def __init__(self, engine, metrics: Metrics | None = None, max_queue: int = 256, prefill_budget: int = 512):
        self.engine = engine
        self.max_queue, self.prefill_budget = max_queue, prefill_budget
        self.metrics = metrics or Metrics()
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._cancels: deque[Job] = deque()
        self._running: dict[int, Job] = {}        # job id (= engine request id) -> job
        self._stop = False
        self._error: str | None = None
        self.slots_used = self.cache_used_tokens = 0
        self._thread = threading.Thread(target=self._run, name="dsv2-engine", daemon=True)
        self._declare_metrics()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    # ---------------------------------------------------- event-loop side API
    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (all of one HTTP request, so an n>1 request is admitted or refused whole)."""
        with self._lock:
            if self._error is not None:
                raise RuntimeError(self._error)
            # Jobs about to take a free slot are not "queued"; the bound is on those that must wait.
            free = self.engine.slots - self.slots_used
            if len(self._waiting) + len(jobs) > self.max_queue + free:
                self.metrics.inc("requests_rejected_total", reason="queue_full")
                raise QueueFull(f"the server's waiting queue is full ({self.max_queue} requests); retry shortly.")
            self._waiting.extend(jobs)
            self._lock.notify_all()

    def cancel(self, jobs: list[Job]) -> None:
        """The client went away: stop generating and free the slots (done on the engine thread)."""
        with self._lock:
            for job in jobs:
                if not job.done and not job.cancelled:
                    job.cancelled = True
                    self._cancels.append(job)
            self._lock.notify_all()

    # -------------------------------------------------------------- counts
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._running)

    def _snapshot(self) -> None:
        # Taken on the engine thread after each turn: /metrics must not walk the engine's
        # dicts while the engine thread changes them.
        lengths, active = self.engine.cache.lengths, self.engine.active
        self.slots_used = len(active)
        self.cache_used_tokens = sum(lengths[s] for s in active)

    def capacity(self) -> str:
        """What the latent cache holds, for the start-up log line."""
        c = self.engine.cache
        return (f"latent cache {c.nbytes / 2**20:,.1f} MiB in {c.kv_cache_dtype} ({c.bytes_per_token():,} bytes/token, "
                f"{c.bits_per_element():.2f} bits/element) holds "
                f"{c.capacity_tokens():,} tokens: {c.slots} slots x {c.max_len} positions, so at most "
                f"{c.slots} requests run at once (prompt + completion <= {c.max_len} tokens each); "
                f"{self.max_queue} more may wait")

    # ---------------------------------------------------------- engine thread
    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stop and not self._waiting and not self._running and not self._cancels:
                        self._lock.wait()
                    if self._stop:
                        break
                    cancels = list(self._cancels)
                    self._cancels.clear()
                for job in cancels:
                    self._retire(job, "cancelled")
                self._admit()
                if self._running:
                    self._step()
                self._snapshot()
        except Exception as e:  # noqa: BLE001 - the engine broke: fail every request, stay up for /health
            log.exception("engine thread failed")
            self._error = f"the engine failed ({type(e).__name__}: {e}); restart the server."
            self._fail_all()

    def _admit(self) -> None:
        """Prefill waiting requests into free slots, at most `prefill_budget` prompt tokens per turn
        (always at least one request), so a burst of arrivals delays the running streams by a
        bounded prefill between two decode steps instead of stalling them for every prompt. The
        turn's fresh prompts are prefilled together (Engine.add_many: one padded forward)."""
        spent, batch = 0, []
        free = self.engine.slots - len(self.engine.active)
        while len(batch) < free:
            with self._lock:
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()     # its cancel is (or will be) finished by _retire
                if not self._waiting or (spent and spent + len(self._waiting[0].prompt_ids) > self.prefill_budget):
                    break
                job = self._waiting.popleft()
            spent += len(job.prompt_ids)
            try:
                self.engine.validate(Request(job.prompt_ids, job.params, id=job.id))
            except ValueError as e:     # prepare.py checks first, so this is a bug guard, not a path
                job.finish_reason = "error"
                self._emit(job, {"index": job.index, "error": str(e), "status": 400})
                continue
            batch.append(job)
        if not batch:
            return
        try:
            self.engine.add_many([Request(j.prompt_ids, j.params, id=j.id) for j in batch])   # prefill
        except (RuntimeError, MemoryError) as e:  # e.g. out of memory on a long prompt: fail these, not all
            log.exception("prefill failed")
            for job in batch:
                self.engine.cancel(job.id)
                job.finish_reason = "error"
                self._emit(job, {"index": job.index, "status": 500,
                                 "error": f"this request could not be prefilled ({type(e).__name__}: {str(e)[:200]})."})
            return
        for job in batch:
            self._running[job.id] = job
            self.metrics.inc("prompt_tokens_total", len(job.prompt_ids))

    def _step(self) -> None:
        outs = self.engine.step()
        now = time.perf_counter()
        batch: list[tuple[Job, dict]] = []   # this step's events, handed to the event loop at once
        for out in outs:
            job = self._running.get(out.request_id)
            if job is None:
                continue
            if job.t_last is None:
                self.metrics.observe("time_to_first_token_seconds", now - job.t_submit)
            else:
                self.metrics.observe("inter_token_latency_seconds", now - job.t_last)
            job.t_last = now
            job.n_generated += 1
            self.metrics.inc("generation_tokens_total")
            extra = {} if out.logprob is None else {"lp": (out.token_id, out.logprob, out.top_logprobs)}
            if out.prompt_logprobs is not None:
                extra["prompt_lp"] = [(t, lp, top) for t, (lp, top) in zip(job.prompt_ids, out.prompt_logprobs)]
            if out.finished:            # the engine has freed the slot already
                del self._running[job.id]
                self._finish(job, out.finish_reason, out.text, extra, batch)
            elif out.text or extra:
                batch.append((job, {"index": job.index, "text": out.text} | extra))
        self._emit_all(batch)

    def _retire(self, job: Job, reason: str) -> None:
        """End a job early (cancelled): free its slot now."""
        if job.done:
            return
        if self._running.pop(job.id, None) is not None:
            self.engine.cancel(job.id)
        self._finish(job, reason)

    def _finish(self, job: Job, reason: str, text: str = "", extra: dict | None = None,
                batch: list | None = None) -> None:
        job.finish_reason = reason
        self.metrics.inc("requests_finished_total", reason=reason)
        event = {"index": job.index, "text": text, "finish_reason": reason,
                 "completion_tokens": job.n_generated} | (extra or {})
        if batch is None:
            self._emit(job, event)
        else:
            batch.append((job, event))

    def _fail_all(self) -> None:
        with self._lock:
            jobs = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
        for job in jobs:
            job.finish_reason = "error"
            self._emit(job, {"index": job.index, "error": self._error})

    @staticmethod
    def _emit_all(batch: list[tuple[Job, dict]]) -> None:
        """One wake-up of each event loop for a step's events (64 streams: one, not 64), in order."""
        loops: dict = {}
        for job, event in batch:
            loops.setdefault(job.loop, []).append((job.events, event))
        for loop, items in loops.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:   # the event loop is closed (server shutting down)
                pass

    @classmethod
    def _emit(cls, job: Job, event: dict) -> None:
        cls._emit_all([(job, event)])

    # ------------------------------------------------------------- metrics
    def _declare_metrics(self) -> None:
        m = self.metrics
        m.counter("requests_total", "HTTP requests by endpoint and status code")
        m.counter("requests_rejected_total", "requests refused before queueing, by reason")
        m.counter("requests_finished_total", "generations ended, by finish reason (stop, length, cancelled)")
        m.counter("prompt_tokens_total", "prompt tokens prefilled")
        m.counter("generation_tokens_total", "tokens generated")
        m.gauge("queue_depth", "requests waiting for a slot", lambda: self.queue_depth)
        m.gauge("running_requests", "requests in the running decode batch", lambda: self.batch_size)
        m.gauge("cache_slots_total", "sequences the latent cache can hold at once", lambda: self.engine.slots)
        m.gauge("cache_slots_used", "latent cache slots holding a running sequence", lambda: self.slots_used)
        m.gauge("cache_capacity_tokens", "tokens the latent cache can hold", self.engine.cache.capacity_tokens)
        m.gauge("cache_used_tokens", "tokens held in the latent cache by running requests",
                lambda: self.cache_used_tokens)
        m.histogram("time_to_first_token_seconds", "time from arrival to the first generated token")
        m.histogram("inter_token_latency_seconds", "time between consecutive tokens of one request")


def _deliver(items: list) -> None:
    """On the event loop: each event into its request's queue."""
    for queue, event in items:
        queue.put_nowait(event)
