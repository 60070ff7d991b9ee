"""DeepSeek-V2-Lite at full size on this machine: stream-quantized loading, the memory pre-flight
against the measured peak, first-token latency, decode tokens/s at batch 1 and 8, and the roofline.

    .venv/bin/python bench/make_checkpoint.py deepseek-v2-lite /work/v2/lite          # once: 31 GB
    .venv/bin/python bench/full_size.py /work/v2/lite                                  # int8, 4096 x 8
    .venv/bin/python bench/full_size.py /work/v2/lite --configs int8:4096:8,fp8:4096:8,int8:32768:4
    .venv/bin/python bench/full_size.py /work/v2/lite --configs int8:4096:8 --json out.json

Each configuration (quantize:max_len:slots) runs in its own process, so its peak resident
memory (ru_maxrss) is its own. In that process: the pre-flight estimate (engine/memory.py) is
taken first, before any weight is read; then the checkpoint is loaded, quantized tensor by
tensor; an engine of `slots` x `max_len` is made (its latent cache is zeroed, so all of it is
resident); a --prompt-token random prompt is prefilled (first-token latency = prefill + the
first sampled token); one sequence decodes --new-tokens greedy tokens (batch 1), then, where
slots allow, 8 sequences of 64-token prompts decode together (batch 8).

Roofline: a decode step must read its weights (bench/common.weight_bytes_per_step: every dense
matrix, and the routed experts a batch of B is expected to touch, E (1 - (1 - K/E)^B)), so
tokens/s <= B x bandwidth / bytes, with the bandwidth of a large copy measured in the same
process. At batch 1 V2-Lite reads ~2.6 GB in int8 (6 of 64 experts per MoE layer, the head).
The llama.cpp q8_0 figures on the same weights come from bench/llama_cpp.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from dsv2.bench.common import cpu_name, run_child

GiB = 2**30


def _child(spec: dict) -> dict:
    import torch

    from dsv2.bench.common import copy_bandwidth, decode_rates, random_prompts, weight_bytes_per_step
    from dsv2.checkpoint import load_pretrained
    from dsv2.engine import Engine, Request
    from dsv2.engine.memory import plan_memory
    from dsv2.engine.sampling import SamplingParams
    bw = copy_bandwidth()   # first, so its two 256 MiB buffers are gone before the model arrives
    path, q, max_len, slots = spec["model"], spec["quantize"], spec["max_len"], spec["slots"]
    plan = plan_memory(path, None, q, max_len, slots, spec["kv_cache_dtype"])
    t = time.perf_counter()
    model = load_pretrained(path, quantize=q)
    res = {"config": f"{q}:{max_len}:{slots}", "load_s": time.perf_counter() - t, "plan": plan.table(),
           "estimate_gib": plan.peak / GiB, "weights_gib": plan.weights / GiB}
    res["load_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    cfg = model.config
    eng = Engine(model, max_batch_slots=slots, max_len=max_len, kv_cache_dtype=spec["kv_cache_dtype"])
    res["fused"] = eng._decode.native is not None
    prompt = random_prompts(1, spec["prompt_tokens"], cfg.vocab_size, 0)[0].tolist()
    t = time.perf_counter()
    eng.add(Request(prompt, SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)))
    eng.step()   # hands out the first token
    res["first_token_s"] = time.perf_counter() - t
    res["prefill_tok_s"] = spec["prompt_tokens"] / res["first_token_s"]
    res["copy_bandwidth_gbs"] = bw / 1e9
    for B in [b for b in spec["batches"] if b <= slots]:
        if B > 1:
            del eng   # one engine (one cache) at a time, as a server holds
            eng = Engine(model, max_batch_slots=slots, max_len=max_len, kv_cache_dtype=spec["kv_cache_dtype"])
            params = SamplingParams(max_new_tokens=spec["new_tokens"], ignore_eos=True)
            for r in random_prompts(B, 64, cfg.vocab_size, 1).tolist():
                eng.add(Request(r, params))
            eng.step()
        best, avg, _ = decode_rates(eng.step, spec["new_tokens"] - 2, B)
        read = weight_bytes_per_step(model, B)
        roof = B * bw / read   # bw: bytes a large copy moves per second, as bench/generate.py
        res[f"decode_b{B}_tok_s"], res[f"decode_b{B}_avg_tok_s"] = best, avg
        res[f"decode_b{B}_roofline_tok_s"] = roof
        res[f"decode_b{B}_roofline_frac"] = best / roof
        res[f"weights_read_b{B}_gb"] = read / 1e9
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
    res["estimate_error"] = res["estimate_gib"] / res["peak_rss_gib"] - 1
    res["threads"] = torch.get_num_threads()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="checkpoint directory (bench/make_checkpoint.py deepseek-v2-lite DIR)")
    p.add_argument("--configs", default="int8:4096:8", help="quantize:max_len:slots, comma-separated")
    p.add_argument("--kv-cache-dtype", default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=34)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    if not args.model or not os.path.isdir(args.model):
        raise SystemExit(f"no checkpoint directory at {args.model}: write one with "
                         "`bench/make_checkpoint.py deepseek-v2-lite DIR` first.")
    results = []
    for c in args.configs.split(","):
        q, max_len, slots = c.split(":")
        spec = dict(model=args.model, quantize=None if q in ("none", "") else q, max_len=int(max_len),
                    slots=int(slots), kv_cache_dtype=args.kv_cache_dtype, prompt_tokens=args.prompt_tokens,
                    new_tokens=args.new_tokens, batches=[int(b) for b in args.batches.split(",")])
        r = run_child(__file__, spec)
        results.append(r)
        print(r.pop("plan"), flush=True)
        print(json.dumps(r), flush=True)
    cpu = cpu_name()
    print(f"\n{args.model} on {cpu}, {results[0]['threads']} threads")
    print(f"{'config':<16}{'load s':>8}{'TTFT s':>8}{'b1 tok/s':>10}{'b1 roof':>9}{'b8 tok/s':>10}{'b8 roof':>9}"
          f"{'peak GiB':>10}{'estimate':>10}{'error':>8}")
    for r in results:
        print(f"{r['config']:<16}{r['load_s']:>8.0f}{r['first_token_s']:>8.1f}{r.get('decode_b1_tok_s', 0):>10.2f}"
              f"{r.get('decode_b1_roofline_frac', 0):>9.0%}{r.get('decode_b8_tok_s', 0):>10.2f}"
              f"{r.get('decode_b8_roofline_frac', 0):>9.0%}{r['peak_rss_gib']:>10.2f}{r['estimate_gib']:>10.2f}"
              f"{r['estimate_error']:>+8.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
