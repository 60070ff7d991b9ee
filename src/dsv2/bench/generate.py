"""`dsv2 bench` (= bench/generate.py): dsv2's engine beside transformers, same weights, same run.

    dsv2 bench                                               # small preset: float32, bfloat16, int8
    python bench/generate.py --repeat 2 --no-native          # two rounds, PyTorch-op decode
    python bench/generate.py --dtypes float32 --no-peer
    OMP_WAIT_POLICY=PASSIVE dsv2 bench                       # on cores shared with other jobs

Random weights for the preset are written once to a temporary directory in Hugging Face
format (common.random_checkpoint); each (engine, dtype) is then measured in its own child
process (children.py), which loads them, so peak memory (max RSS) is that engine's alone and
one engine's allocator state cannot slow the next. Children inherit the caller's environment: spinning OpenMP threads (the default)
decode 1.3-1.8x faster than OMP_WAIT_POLICY=PASSIVE on an idle machine, for both engines;
PASSIVE keeps other jobs on the same cores from stalling them. Measured per engine:
- prefill tokens/s: one 512-token prompt, batch 1 (ours: Engine.add, which writes the cache
  and samples; theirs: a forward with use_cache=True and logits_to_keep=1, as its generate()
  prefills). Best of 3.
- decode tokens/s at batch 1 and 16: 128-token prompts, 128 new tokens, EOS ignored, greedy:
  the 127 decode steps after the prefill token (ours: Engine.step; theirs: generate(), each
  step's time taken by a streamer). The table shows the best window
  of 8 consecutive steps (the machine is shared; other jobs' bursts hit single windows), with
  the whole-run average beside it.
- KV-cache bytes per token (theirs: the bytes its cache object holds after 128 tokens).
- decode as a fraction of the memory-bandwidth roofline: bytes of weights a decode step
  reads (attention, dense and shared weights, the head, and the routed experts the batch
  is expected to touch under uniform routing, E(1 - (1 - K/E)^B)), counted as dsv2 stores them
  (an int8 model's int8 rows and scales, and its float32 kv_b_proj and router), over the copy
  bandwidth, times B. dsv2's child measures the bandwidth just before it decodes (this machine's drifts by
  up to 1.5x from minute to minute); transformers' rows use the figure printed at the start.

Decode runs through the fused CPU step (native) unless --no-native; the row says which.
Measured figures, with their date and CPU, and what bounds each of them, are in the README
("Generation").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

from ..dtypes import KV_CACHE_DTYPES
from ..options import add_native
from .common import copy_bandwidth, cpu_name, random_checkpoint, run_child, weight_bytes_per_step


def _args(argv=None):
    p = argparse.ArgumentParser(prog="dsv2 bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p) -> None:
    p.add_argument("--preset", default="small", help="model preset (default small, the benchmark config)")
    p.add_argument("--dtypes", default="float32,bfloat16,int8",
                   help="comma list of float32, bfloat16, int8 (dsv2's int8 weights, inputs rounded to int16; "
                        "no peer row), fp8 (dsv2's e4m3 block-scaled matrices, the rest bfloat16; no peer row). "
                        "Default: float32,bfloat16,int8")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="dsv2's latent-cache format (default: the model's dtype)")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,16", help="decode batch sizes (default 1,16; '' for the prefill only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds; best figure per engine (default 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile dsv2's decode step")
    p.add_argument("--profile", action="store_true",
                   help="also print where dsv2's prefill spends its time (torch.profiler, by operator and shape)")
    add_native(p)
    p.add_argument("--json", help="also write the results to this file")


def run(args) -> int:
    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "int8", "fp8"):
            raise ValueError(f"--dtypes takes float32, bfloat16, int8 and/or fp8, got {d!r}.")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    bw = copy_bandwidth()
    load = os.getloadavg()[0]
    rows, printed = {}, False
    with tempfile.TemporaryDirectory() as tmp:
        model = random_checkpoint(tmp, args.preset)
        print(f"CPU: {cpu_name()}", flush=True)
        print(f"dsv2 bench: preset {args.preset} ({model.num_params() / 1e6:.1f}M params, "
              f"{model.active_params() / 1e6:.1f}M active), {args.threads} threads, load avg {load:.2f}, "
              f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
        # Rounds interleave the engines so load changes on a shared machine hit both alike;
        # each figure is the best over rounds.
        for rnd in range(args.repeat):
            for dtype in dtypes:
                for engine in ["dsv2"] + ([] if args.no_peer or dtype in ("int8", "fp8") else ["transformers"]):
                    spec = dict(engine=engine, dtype=dtype, path=tmp, threads=args.threads, batches=batches,
                                prefill_len=args.prefill_len, prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens, compile=args.compile, native=args.native,
                                kv_cache_dtype=args.kv_cache_dtype, profile=args.profile)
                    res = run_child("dsv2.bench.children", spec)
                    res.update(engine=engine, dtype=dtype, load=os.getloadavg()[0])
                    prev = rows.get((engine, dtype))
                    if prev is not None:
                        res = {k: max(v, prev[k]) if "tok_" in k else v for k, v in res.items()}
                    rows[(engine, dtype)] = res
                    if rnd == args.repeat - 1:
                        _print_row(res, batches, model, bw, header=not printed)
                        printed = True
                        if res.get("prefill_profile"):
                            print(f"dsv2 {dtype} prefill of {args.prefill_len} tokens, by operator:\n"
                                  + res.pop("prefill_profile"), flush=True)
    rows = list(rows.values())
    _print_ratios(rows, batches)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, copy_bandwidth_gb_s=bw / 1e9, load=load), f, indent=1)
    return 0


def _print_row(r: dict, batches, model, bw: float, header: bool) -> None:
    if header:
        cols = ["engine", "dtype", "prefill tok/s"] + [f"decode b{b} tok/s best/avg (roofline %)" for b in batches]
        print(" | ".join(cols) + " | KV bytes/token | peak RSS MB | load")
    esz = {"float32": 4, "bfloat16": 2, "int8": 1, "fp8": 1}[r["dtype"]]   # peers: every matrix in r's dtype
    cells = [f"{r['engine']:<12}", f"{r['dtype']:<8}", f"{r['prefill_tok_s']:>9,.0f}"]
    bw = r.get("bandwidth") or bw   # dsv2's child measures it just before decoding
    for b in batches:
        read = r.get(f"weight_bytes_b{b}") or weight_bytes_per_step(model, b) * esz / 4   # dsv2: as stored
        roof = b * bw / read
        cells.append(f"{r[f'decode_b{b}_tok_s']:>7,.1f}/{r[f'decode_b{b}_avg_tok_s']:<7,.1f} "
                     f"({100 * r[f'decode_b{b}_tok_s'] / roof:4.1f}%)")
    cells += [f"{r['kv_bytes_per_token']:>8,}", f"{r['peak_rss_mb']:>7,.0f}", f"{r['load']:.1f}"]
    if r.get("compiled"):
        cells.append("(compiled decode)")
    elif r["engine"] == "dsv2" and batches:
        cells.append("(fused C decode)" if r.get("fused") else "(PyTorch-op decode)")
    print(" | ".join(cells), flush=True)


def _print_ratios(rows, batches) -> None:
    ref = next((r for r in rows if r["engine"] == "transformers" and r["dtype"] == "float32"), None)
    ours = [r for r in rows if r["engine"] == "dsv2"]
    if ref is None or not ours:
        return
    names = ["prefill"] + [f"decode_b{b}" for b in batches]
    for title, suffix in (("wall clock (decode: best 8-step window)", "_tok_s"),
                          ("wall clock, whole-run average", "_avg_tok_s"),
                          ("per CPU-second (least disturbed by other jobs)", "_tok_cpu_s")):
        keys = [n + suffix for n in names]
        if not all(k in ref for k in keys) and suffix == "_avg_tok_s":
            keys = [k if k in ref else n + "_tok_s" for k, n in zip(keys, names)]
        print(f"ratio to transformers float32, {title}:")
        for r in ours:
            print(f"  dsv2 {r['dtype']:<9}" + "  ".join(f"{n} {r[k] / ref[k]:.2f}x" for n, k in zip(names, keys)))
        if len(ours) > 1:
            print("  dsv2 best     " + "  ".join(f"{n} {max(r[k] for r in ours) / ref[k]:.2f}x"
                                            for n, k in zip(names, keys)))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark generation: dsv2 beside transformers, same weights, same run",
                       description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(func=run)


if __name__ == "__main__":
    sys.exit(run(_args()))
