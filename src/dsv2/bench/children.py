"""The measuring children of `dsv2 bench`: one process per (engine, dtype), so peak memory is
that engine's alone and one engine's allocator state cannot slow the next.

    python -m dsv2.bench.children --child '{"engine": "dsv2", "dtype": "float32", ...}'   # what run_child runs

Each prints one `RESULT {json}` line (common.report). What is measured is in generate.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .common import best_time, best_window, copy_bandwidth, decode_rates, random_prompts, report, weight_bytes_per_step


def _child_dsv2(path, dtype, a) -> dict:
    from ..engine import Engine, Request
    from ..engine.llm import LLM
    from ..engine.sampling import SamplingParams
    native = a.get("native")
    kv = a.get("kv_cache_dtype")
    llm = LLM(path, dtype=dtype, compile=a["compile"], quantize=a["dtype"] if a["dtype"] in ("int8", "fp8") else None,
              native=native, kv_cache_dtype=kv)
    cfg = llm.model.config
    res = {}
    eng = Engine(llm.model, max_batch_slots=1, max_len=a["prefill_len"] + 8, compile=False, kv_cache_dtype=kv)
    x = random_prompts(1, a["prefill_len"], cfg.vocab_size, 0)[0].tolist()

    def prefill():
        eng.add(Request(x, SamplingParams(max_new_tokens=1)))
        eng.free(0)
        eng.cached_ids[0] = []  # no prefix reuse between repeats

    prefill()
    wall, cpu = best_time(prefill)
    res["prefill_tok_s"], res["prefill_tok_cpu_s"] = a["prefill_len"] / wall, a["prefill_len"] / cpu
    if a.get("profile"):
        res["prefill_profile"] = _profile(prefill)
    res["bandwidth"] = copy_bandwidth()   # this machine's drifts: the roofline uses what it was just now
    for B in a["batches"]:
        eng = Engine(llm.model, max_batch_slots=B, max_len=a["prompt_len"] + a["new_tokens"] + 1,
                     compile=a["compile"], native=native, kv_cache_dtype=kv)
        params = SamplingParams(max_new_tokens=a["new_tokens"], ignore_eos=True)
        for r in random_prompts(B, a["prompt_len"], cfg.vocab_size, 1).tolist():
            eng.add(Request(r, params))
        eng.step()  # hands out the prefill tokens
        rates = decode_rates(eng.step, a["new_tokens"] - 1, B)
        res[f"decode_b{B}_tok_s"], res[f"decode_b{B}_avg_tok_s"], res[f"decode_b{B}_tok_cpu_s"] = rates
        # the bytes this model's step reads, as stored (int8 models keep kv_b_proj and the router float32)
        res[f"weight_bytes_b{B}"] = weight_bytes_per_step(llm.model, B)
        res["compiled"] = eng._decode.compiled
        res["fused"] = eng._decode.native is not None
    res["kv_bytes_per_token"] = eng.cache.bytes_per_token()
    return res


def _profile(fn, rows: int = 15) -> str:
    """torch.profiler's table of fn's operators by their own CPU time, with input shapes (the
    GEMM shapes say which projection each line is)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=50)


class _StepClock:
    """A transformers streamer that only notes when each step's tokens arrive: put() is called
    with the prompt, then once per generated token (per step for the whole batch)."""

    def __init__(self):
        self.wall, self.cpu = [], []

    def put(self, value):
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self):
        pass


def _child_peer(path, dtype, a) -> dict:
    """transformers as its users run it: generate(), greedy, EOS ignored; a streamer notes the
    time of each step so its decode is timed exactly like ours (Engine.step per token)."""
    from transformers import DeepseekV2ForCausalLM
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    V = model.config.vocab_size
    res = {}
    x = random_prompts(1, a["prefill_len"], V, 0)
    with torch.inference_mode():
        prefill = lambda: model(x, use_cache=True, logits_to_keep=1)  # noqa: E731 (as generate() prefills)
        prefill()
        wall, cpu = best_time(prefill)
        res["prefill_tok_s"], res["prefill_tok_cpu_s"] = a["prefill_len"] / wall, a["prefill_len"] / cpu
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        for B in a["batches"]:
            xs = random_prompts(B, a["prompt_len"], V, 1)
            model.generate(xs, max_new_tokens=4, **kw)  # warm-up
            clock = _StepClock()
            out = model.generate(xs, max_new_tokens=a["new_tokens"], min_new_tokens=a["new_tokens"],
                                 streamer=clock, return_dict_in_generate=True, **kw)
            # put() #0 is the prompt, #1 the prefill's token; then one per decode step. As for ours,
            # the first decode step is a warm-up.
            wall_t, cpu_t = clock.wall[2:], clock.cpu[2:]
            times = [b - a_ for a_, b in zip(wall_t, wall_t[1:])]
            res[f"decode_b{B}_tok_s"] = best_window(times, B)
            res[f"decode_b{B}_avg_tok_s"] = B * len(times) / sum(times)
            res[f"decode_b{B}_tok_cpu_s"] = B * len(times) / max(cpu_t[-1] - cpu_t[0], 1e-9)
        if a["batches"]:   # the last batch's cache
            held = sum(t.numel() * t.element_size() for t in _tensors(out.past_key_values))
            res["kv_bytes_per_token"] = held // (B * (a["prompt_len"] + a["new_tokens"] - 1))
        else:              # prefill only: the prompt's cache
            held = sum(t.numel() * t.element_size() for t in _tensors(prefill().past_key_values))
            res["kv_bytes_per_token"] = held // a["prefill_len"]
    return res


def _tensors(obj, seen=None):
    """Every tensor reachable from a transformers cache object."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, seen)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("transformers"):
        for o in vars(obj).values():
            yield from _tensors(o, seen)


def _child(spec: str) -> None:
    a = json.loads(spec)
    torch.set_num_threads(a["threads"])
    # int8: float32 around the int8 matrices; fp8: bfloat16 around the e4m3 ones, as DeepSeek's checkpoints
    dtype = {"int8": torch.float32, "fp8": torch.bfloat16}.get(a["dtype"]) or getattr(torch, a["dtype"])
    fn = _child_dsv2 if a["engine"] == "dsv2" else _child_peer
    res = fn(a["path"], dtype, a)
    report(res)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m dsv2.bench.children")
    p.add_argument("--child", required=True, help="the JSON spec run_child passes")
    _child(p.parse_args().child)
