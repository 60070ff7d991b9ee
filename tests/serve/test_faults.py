"""Faults: clients that leave, bursts over the queue bound. The server must free what a
departed client held, refuse what it cannot queue with 429, and keep serving everyone else."""

from __future__ import annotations

import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from serve_helpers import MAX_QUEUE, SLOTS, post
from dsv2.serve.metrics import parse_prometheus

MODEL = "tiny-chat"
NO_EOS = {"ignore_eos": True}


def metrics(server) -> dict[str, float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        return parse_prometheus(r.read().decode())


def wait_for(server, cond, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        if cond(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s; metrics: {m}")
        time.sleep(0.05)


CANCELLED = 'dsv2_requests_finished_total{reason="cancelled"}'


def test_disconnect_mid_stream_frees_the_slot(server, client):
    kw = dict(model=MODEL, prompt="others finish", max_tokens=60, temperature=0, extra_body=NO_EOS)
    want = client.completions.create(**kw).choices[0].text
    wait_for(server, lambda m: m["dsv2_cache_slots_used"] == 0)
    before = metrics(server)
    # A bystander runs while the streaming client leaves.
    with ThreadPoolExecutor(1) as pool:
        bystander = pool.submit(client.completions.create, **kw)
        stream = client.completions.create(model=MODEL, prompt="I will leave", max_tokens=200, stream=True,
                                           extra_body=NO_EOS)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        assert metrics(server)["dsv2_cache_slots_used"] >= 1
        stream.close()                      # the client hangs up mid-stream
        for body in (b"{not json", {"model": MODEL, "prompt": [5] * 999}, {"model": MODEL, "prompt": "x", "n": 99}):
            assert post(server.url, "/v1/completions", body)[0] == 400    # bad requests meanwhile
        after = wait_for(server, lambda m: m.get(CANCELLED, 0) == before.get(CANCELLED, 0) + 1)
        assert bystander.result(timeout=60).choices[0].text == want
    after = wait_for(server, lambda m: m["dsv2_cache_slots_used"] == 0 and m["dsv2_running_requests"] == 0)
    generated = after["dsv2_generation_tokens_total"] - before["dsv2_generation_tokens_total"]
    assert generated < 60 + 200             # the departed stream did not run to its max_tokens
    assert after["dsv2_cache_used_tokens"] == 0


def test_non_streaming_client_timeout_cancels(server, client):
    before = metrics(server)
    # Gone before 240 tokens are done: the fused decode step takes ~0.5 ms a token of this model here.
    impatient = client.with_options(timeout=0.05, max_retries=0)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="slow", max_tokens=240, extra_body=NO_EOS)
    wait_for(server, lambda m: m.get(CANCELLED, 0) == before.get(CANCELLED, 0) + 1
             and m["dsv2_cache_slots_used"] == 0)


def test_burst_over_the_queue_bound_gets_429(server, client):
    n = 3 * (SLOTS + MAX_QUEUE)
    before = metrics(server)
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        try:
            r = client.completions.create(model=MODEL, prompt=f"burst {i}", max_tokens=120, extra_body=NO_EOS)
            return r.usage.completion_tokens
        except openai.RateLimitError as e:
            assert "queue is full" in e.message
            return 429

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    refused = results.count(429)
    assert refused >= n - 2 * (SLOTS + MAX_QUEUE)       # at most slots + queue fit while the first ones run
    assert results.count(120) == n - refused and n - refused >= SLOTS
    after = metrics(server)
    assert after['dsv2_requests_rejected_total{reason="queue_full"}'] - before.get(
        'dsv2_requests_rejected_total{reason="queue_full"}', 0) == refused
    # Still healthy, and serving.
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert r.status == 200
    assert client.completions.create(model=MODEL, prompt="after", max_tokens=3,
                                     extra_body=NO_EOS).usage.completion_tokens == 3
    assert after["dsv2_queue_depth"] == 0
