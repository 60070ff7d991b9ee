"""Load benchmark for `dsv2 serve`: 64 concurrent streaming clients, then the same requests one at a time.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_load.py                   # small preset, 64 clients
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_load.py --clients 16 --max-tokens 64 --dtype bfloat16
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_load.py --sequential 64   # replay all 64 one by one (~15 min)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_load.py --engine-baseline # + the bare engine, same prompts
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_load.py --quantize int8   # int8 weights (dsv2 serve --quantize)
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/serve_load.py --capacity bfloat16,fp8,mixed --kv-cache-mb 36
                                                # one cache budget, three formats: slots and tokens/s

A `small` DeepSeek-V2 with random weights and a byte-level BPE trained on this repository's
text are written to a temporary folder; `dsv2 serve` runs on it in a child process on a free
127.0.0.1 port (so the clients' Python does not share the server's interpreter), and the
official `openai` AsyncOpenAI client drives it with streaming requests (stream_options
include_usage, ignore_eos so every request must return exactly --max-tokens tokens).

Reported (client side): aggregate generated tokens/s of the concurrent phase; time to first
token and inter-token latency percentiles; the same for the sequential phase; the speed-up
(concurrent tokens/s over sequential tokens/s; target >= 5x); and whether every request
returned the right number of tokens. Only the first --sequential requests (default 8) are
replayed one by one (one-at-a-time throughput does not depend on how many are replayed, and
all 64 would take ~15 minutes on 2 cores); half of them run before the concurrent phase and
half after, so drift in the machine's load weighs on both sides of the ratio. Sampling is
seeded per request, so the concurrent and sequential answers can also be compared text for
text (reported, not required: batched and single forwards round differently).

--capacity FORMATS instead serves the same model once per latent-cache format with the cache
sized to one budget (`dsv2 serve --kv-cache-gb`): a format with fewer bytes per token holds
more sequences of the same length, so more requests decode together. Each server gets the
same requests at once (default: as many as the roomiest format holds); reported per format:
bytes/token, the concurrent sequences the budget holds, and the aggregate tokens/s. This is
the paper's claim that a smaller KV cache raises the maximum generation throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from dsv2.bench.common import cpu_name, percentile, random_checkpoint
from dsv2.options import add_dtype

ROOT = Path(__file__).resolve().parents[1]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=24, help="words per prompt (about as many tokens)")
    p.add_argument("--sequential", type=int, default=8,
                   help="how many of the requests to replay one by one (default 8; 0 = all)")
    add_dtype(p, default="float32")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None, help="the server's weights (dsv2 serve --quantize)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the server")
    p.add_argument("--engine-baseline", action="store_true",
                   help="also time the bare engine (dsv2.LLM.generate, no HTTP) on the same 64 prompts")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--capacity", default=None, metavar="FORMATS",
                   help="comma list of --kv-cache-dtype formats to compare at one cache budget (see above)")
    p.add_argument("--kv-cache-mb", type=float, default=36.0, help="with --capacity: the cache budget in MiB")
    return p.parse_args(argv)


# ------------------------------------------------------------------ model and server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, args, max_len: int, extra: tuple = ()) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "dsv2", "serve", str(ckpt), "--port", str(port), "--slots", str(args.clients),
           "--max-len", str(max_len), "--dtype", args.dtype, "--log-level", "warning", *extra,
           *(("--quantize", args.quantize) if args.quantize else ())]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become healthy within 300 s.")


def engine_alone(ckpt: Path, prompts: list[str], args) -> float:
    """Generated tokens/s of the bare engine on the same prompts at the same batch: the server's cost."""
    import torch

    from dsv2.engine.llm import LLM
    torch.set_num_threads(args.threads)
    llm = LLM(ckpt, dtype=args.dtype, max_batch_slots=len(prompts), quantize=args.quantize)
    llm.generate(prompts[:2], max_new_tokens=8, ignore_eos=True)          # warm-up, as the server had
    t0 = time.perf_counter()
    out = llm.generate(prompts, max_new_tokens=args.max_tokens, temperature=1.0, seed=0, ignore_eos=True)
    return sum(len(o.token_ids) for o in out) / (time.perf_counter() - t0)


# ------------------------------------------------------------------ clients
async def one_request(client, model: str, prompt: str, seed: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    arrivals, text, usage, finish = [], [], None, None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                                             seed=seed, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            arrivals.append(time.perf_counter())
            text.append(c.text)
            finish = c.finish_reason or finish
    tokens = usage.completion_tokens if usage else 0
    first, last = arrivals[0], arrivals[-1]
    return {"ttft_s": first - t0, "latency_s": last - t0, "tokens": tokens, "finish": finish, "text": "".join(text),
            # mean gap between tokens after the first (chunks can hold back partial UTF-8, so per-chunk gaps
            # would overstate it); the per-chunk gaps are kept for the tail percentiles
            "itl_mean_s": (last - first) / max(tokens - 1, 1),
            "gaps_s": [b - a for a, b in zip(arrivals, arrivals[1:])]}


async def run_phase(url: str, model: str, prompts: list[str], max_tokens: int, concurrent: bool) -> tuple[list, float]:
    import openai
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) as client:
        t0 = time.perf_counter()
        if concurrent:
            results = await asyncio.gather(*(one_request(client, model, p, i, max_tokens)
                                             for i, p in enumerate(prompts)))
        else:
            results = [await one_request(client, model, p, i, max_tokens) for i, p in enumerate(prompts)]
        return list(results), time.perf_counter() - t0


def summarize(name: str, results: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in results)
    gaps = [g for r in results for g in r["gaps_s"]]
    ttft = [r["ttft_s"] for r in results]
    itl = [r["itl_mean_s"] for r in results]
    out = {"phase": name, "requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}
    for label, xs in (("ttft_ms", ttft), ("itl_ms", itl), ("chunk_gap_ms", gaps)):
        out[label] = {f"p{q}": 1000 * percentile(xs, q) for q in (50, 90, 99)} | {"mean": 1000 * statistics.fmean(xs)}
    return out


def show(s: dict) -> None:
    f = lambda d: " / ".join(f"{d[k]:8.1f}" for k in ("p50", "p90", "p99"))  # noqa: E731
    print(f"{s['phase']:<11} {s['requests']:>3} req  {s['tokens']:>6} tok  {s['wall_s']:7.1f} s  "
          f"{s['tokens_per_s']:8.1f} tok/s | TTFT ms p50/p90/p99 {f(s['ttft_ms'])} | "
          f"ITL ms p50/p90/p99 {f(s['itl_ms'])} | chunk gap p99 {s['chunk_gap_ms']['p99']:.1f} ms")


def make_prompts(words: list[str], n: int, length: int) -> list[str]:
    """n prompts of `length` words, each starting 7 words after the last (wrapping)."""
    return [" ".join(words[(7 * i) % (len(words) - length):][:length]) for i in range(n)]


def capacity(args, words: list[str]) -> int:
    """One cache budget, one server per format: concurrent sequences and aggregate tokens/s."""
    import torch

    from dsv2 import ModelConfig
    from dsv2.engine.cache import bytes_per_token, slots_for
    formats = [f.strip() for f in args.capacity.split(",") if f.strip()]
    max_len = 4 * args.prompt_words + args.max_tokens + 16
    cfg = ModelConfig.from_preset(args.preset)
    per_token = {f: bytes_per_token(cfg, f, getattr(torch, args.dtype)) for f in formats}
    slots = {f: slots_for(args.kv_cache_mb * 2**20, max_len, per_token[f]) for f in formats}
    clients = max(slots.values())
    prompts = make_prompts(words, clients, args.prompt_words)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{args.preset}-random"
        ckpt.mkdir()
        random_checkpoint(ckpt, args.preset, tokenizer=True)
        for f in formats:
            port = free_port()
            server = start_server(ckpt, port, args, max_len,
                                  ("--kv-cache-dtype", f, "--kv-cache-gb", str(args.kv_cache_mb / 1024)))
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(run_phase(url, ckpt.name, prompts[:2], 8, concurrent=True))   # warm-up
                res, wall = asyncio.run(run_phase(url, ckpt.name, prompts, args.max_tokens, concurrent=True))
            finally:
                server.terminate()
                server.wait(30)
            rows.append({"format": f, "bytes_per_token": per_token[f], "slots": slots[f], **summarize(f, res, wall)})
    print(f"dsv2 serve, preset {args.preset} ({args.dtype} weights, random), latent cache budget "
          f"{args.kv_cache_mb:g} MiB, sequences of {max_len} positions, {clients} streaming clients x "
          f"{args.max_tokens} tokens at once, server on {args.threads} threads, load average {os.getloadavg()[0]:.1f}")
    base = rows[0]
    print(f"{'cache format':<12} {'bytes/token':>12} {'sequences held':>15} {'tokens/s':>10} {'vs ' + base['format']:>14}"
          "  TTFT p50 ms  ITL p50 ms")
    for r in rows:
        print(f"{r['format']:<12} {r['bytes_per_token']:>12,} {r['slots']:>15} {r['tokens_per_s']:>10.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>13.2f}x  {r['ttft_ms']['p50']:>11.0f}  {r['itl_ms']['p50']:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


def main(argv=None) -> int:
    args = _args(argv)
    print(f"CPU: {cpu_name()}", flush=True)
    words = (ROOT / "README.md").read_text().split()
    if args.capacity:
        return capacity(args, words)
    prompts = make_prompts(words, args.clients, args.prompt_words)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{args.preset}-random"
        ckpt.mkdir()
        random_checkpoint(ckpt, args.preset, tokenizer=True)
        port = free_port()
        server = start_server(ckpt, port, args, max_len=4 * args.prompt_words + args.max_tokens + 16)
        url, model = f"http://127.0.0.1:{port}", ckpt.name
        try:
            asyncio.run(run_phase(url, model, prompts[:2], 8, concurrent=True))            # warm-up
            # Half the one-at-a-time replays run before the concurrent phase and half after, so a
            # change in the machine's load during the run weighs on both sides of the ratio.
            k = args.sequential or args.clients
            seq1, wall_1 = asyncio.run(run_phase(url, model, prompts[:k // 2], args.max_tokens, concurrent=False))
            conc, wall_c = asyncio.run(run_phase(url, model, prompts, args.max_tokens, concurrent=True))
            seq2, wall_2 = asyncio.run(run_phase(url, model, prompts[k // 2:k], args.max_tokens, concurrent=False))
            seq, wall_s = seq1 + seq2, wall_1 + wall_2
        finally:
            server.terminate()
            server.wait(30)
        load_bare = os.getloadavg()[0]
        bare = engine_alone(ckpt, prompts, args) if args.engine_baseline else None
    bad = [i for i, r in enumerate(conc + seq) if r["tokens"] != args.max_tokens or r["finish"] != "length"]
    same = sum(a["text"] == b["text"] for a, b in zip(conc, seq))
    s_c, s_s = summarize("concurrent", conc, wall_c), summarize("sequential", seq, wall_s)
    speedup = s_c["tokens_per_s"] / s_s["tokens_per_s"]
    weights = args.dtype + (f", {args.quantize} weights" if args.quantize else "")
    print(f"dsv2 serve, preset {args.preset} ({weights}, random weights), {args.clients} streaming clients x "
          f"{args.max_tokens} tokens, server on {args.threads} threads, {os.cpu_count()} CPUs visible, "
          f"1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after "
          "(other processes skew both phases)")
    show(s_c)
    show(s_s)
    print(f"speed-up (aggregate tokens/s, concurrent over one at a time): {speedup:.1f}x (target >= 5x)")
    if bare is not None:
        print(f"bare engine (LLM.generate, no HTTP) on the same {len(prompts)} prompts: {bare:.1f} tok/s; the server "
              f"delivered {s_c['tokens_per_s'] / bare:.0%} of it (load average {load_bare:.1f} when it started; "
              "a ratio across different loads means little)")
    print(f"token counts: {len(conc) + len(seq) - len(bad)}/{len(conc) + len(seq)} requests returned exactly "
          f"{args.max_tokens} tokens with finish_reason 'length'; identical text concurrent vs sequential: "
          f"{same}/{len(seq)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "concurrent": s_c, "sequential": s_s,
                                               "speedup": speedup, "wrong_counts": len(bad),
                                               "bare_engine_tokens_per_s": bare,
                                               "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
                                               "same_text": same}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
