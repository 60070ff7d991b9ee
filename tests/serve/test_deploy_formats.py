"""Serving with FP8 weights and a packed latent cache sized to a memory budget."""

from __future__ import annotations

import pytest


def test_a_cache_budget_holds_more_sequences_in_fewer_bits_and_serves(model_dir):
    """--kv-cache-gb sizes the slots to the budget in the chosen format; the start-up line says
    the format, bytes per token and how many sequences of the configured length run at once; an
    FP8-weight, 4-bit-latent server answers a request."""
    import openai

    from dsv2.serve.launch import ServerThread, build_server
    budget = 8 * 64 * 2 * (64 + 16) * 4 / 2**30   # 8 sequences of 64 positions, 2 layers of (64 + 16) float32
    slots = {}
    for fmt in ("float32", "fp8", "mixed"):
        app = build_server(model_dir, max_len=64, compile=False, kv_cache_dtype=fmt, kv_cache_gb=budget,
                           quantize="fp8" if fmt == "mixed" else None)
        sched = app.state.scheduler
        slots[fmt] = sched.engine.slots
        line = sched.capacity()
        assert f"in {fmt} (" in line and f"at most {slots[fmt]} requests run at once" in line
        per_token = sched.engine.cache.bytes_per_token()
        assert slots[fmt] == int(budget * 2**30 // (64 * per_token))
    assert slots["float32"] == 8 and slots["float32"] < slots["fp8"] < slots["mixed"]
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        r = client.completions.create(model="tiny-chat", prompt="hello", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 5
    with pytest.raises(ValueError, match="--kv-cache-gb 1e-06 holds no sequence of 64 positions"):
        build_server(model_dir, max_len=64, kv_cache_gb=1e-6)
