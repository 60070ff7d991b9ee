"""The scheduler's policy, against a stub engine that records every call (no model, no HTTP)."""

from __future__ import annotations

import asyncio
import time

from dsv2.engine.engine import StepOutput
from dsv2.engine.sampling import SamplingParams
from dsv2.serve.scheduler import Job, QueueFull, Scheduler


class _Cache:
    def __init__(self, slots):
        self.lengths, self.slots, self.max_len = [0] * slots, slots, 64

    def capacity_tokens(self):
        return self.slots * self.max_len


class StubEngine:
    """Slot engine shape: add()/add_many() prefill, step() yields one token per active request."""

    def __init__(self, slots: int):
        self.slots, self.cache, self.seqs, self.log = slots, _Cache(slots), {}, []

    @property
    def active(self):
        return {s: q[0] for s, q in self.seqs.items()}

    def has_free_slot(self):
        return len(self.seqs) < self.slots

    def validate(self, request):
        pass

    def add_many(self, requests):
        return [self.add(r) for r in requests]

    def add(self, request):
        slot = min(set(range(self.slots)) - set(self.seqs))
        self.seqs[slot] = [request.id, request.params.max_new_tokens]
        self.log.append(("add", request.id))
        return slot

    def step(self):
        time.sleep(0.005)           # a forward takes time; the event loop runs meanwhile
        self.log.append(("step", sorted(q[0] for q in self.seqs.values())))
        outs = []
        for slot, q in sorted(self.seqs.items()):
            q[1] -= 1
            outs.append(StepOutput(q[0], slot, 7, "x", q[1] == 0, "length" if q[1] == 0 else None))
        self.seqs = {s: q for s, q in self.seqs.items() if q[1] > 0}
        return outs

    def cancel(self, request_id):
        self.log.append(("cancel", request_id))
        self.seqs = {s: q for s, q in self.seqs.items() if q[0] != request_id}


async def _run(engine, specs, budget=512, max_queue=16, cancel_after=None):
    """specs: (prompt length, max tokens) per job -> (texts, finish reasons) in job order."""
    sched = Scheduler(engine, max_queue=max_queue, prefill_budget=budget)
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    jobs = [Job([1] * n, SamplingParams(max_new_tokens=m), loop, events, index=i, id=i)
            for i, (n, m) in enumerate(specs)]
    sched.submit(jobs)
    sched.start()
    texts, reasons = [""] * len(jobs), [None] * len(jobs)
    try:
        while None in reasons:
            ev = await asyncio.wait_for(events.get(), 10)
            texts[ev["index"]] += ev["text"]
            if cancel_after is not None and texts[cancel_after] == "xx":
                sched.cancel([jobs[cancel_after]])
            if "finish_reason" in ev:
                reasons[ev["index"]] = ev["finish_reason"]
    finally:
        sched.stop()
    return texts, reasons


def test_new_requests_join_the_running_batch():
    eng = StubEngine(slots=2)
    texts, reasons = asyncio.run(_run(eng, [(3, 6), (3, 2), (3, 3)]))
    assert texts == ["x" * 6, "xx", "xxx"] and reasons == ["length"] * 3
    steps = [ids for kind, ids in eng.log if kind == "step"]
    # Job 2 takes job 1's slot as soon as job 1 is done, while job 0 is still decoding.
    assert steps[:2] == [[0, 1], [0, 1]] and [0, 2] in steps
    assert eng.log.index(("add", 2)) < len(eng.log) - 1 - eng.log[::-1].index(("step", [0, 2]))


def test_prefill_budget_interleaves_prefills_with_decode_steps():
    eng = StubEngine(slots=4)
    asyncio.run(_run(eng, [(6, 4)] * 4, budget=10))
    kinds = [k for k, _ in eng.log]
    # Never two prefills of 6 tokens in one turn with a budget of 10.
    assert "add,add" not in ",".join(kinds)
    assert kinds[:4] == ["add", "step", "add", "step"]


def test_cancel_frees_the_slot_and_finishes_the_job():
    eng = StubEngine(slots=2)
    texts, reasons = asyncio.run(_run(eng, [(2, 400), (2, 5)], cancel_after=0))
    assert reasons == ["cancelled", "length"] and ("cancel", 0) in eng.log
    assert len(texts[0]) < 400


def test_queue_bound_counts_only_requests_that_must_wait():
    async def go():
        sched = Scheduler(StubEngine(slots=2), max_queue=1)
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        make = lambda: Job([1], SamplingParams(max_new_tokens=1), loop, q)  # noqa: E731
        sched.submit([make(), make(), make()])          # 2 take free slots, 1 waits
        try:
            sched.submit([make()])
        except QueueFull as e:
            return str(e)
    assert "queue is full" in asyncio.run(go())


def test_engine_failure_fails_requests_and_marks_unhealthy():
    class Broken(StubEngine):
        def step(self):
            raise RuntimeError("out of memory")

    async def go():
        sched = Scheduler(Broken(slots=2))
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        sched.submit([Job([1], SamplingParams(max_new_tokens=3), loop, q)])
        sched.start()
        ev = await asyncio.wait_for(q.get(), 10)
        sched._thread.join(5)
        try:
            sched.submit([Job([1], SamplingParams(max_new_tokens=3), loop, q)])
        except RuntimeError as e:
            refused = str(e)
        return ev, sched.healthy, refused

    ev, healthy, refused = asyncio.run(go())
    assert "out of memory" in ev["error"] and not healthy and "restart the server" in refused
