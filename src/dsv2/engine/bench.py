"""`dsv2 bench` / bench/generate.py: dsv2's engine beside transformers, same weights, same run.

    dsv2 bench                                               # small preset: float32, bfloat16, int8
    python bench/generate.py --repeat 2 --no-native          # two rounds, PyTorch-op decode
    python bench/generate.py --dtypes float32 --no-peer
    OMP_WAIT_POLICY=PASSIVE dsv2 bench                       # on cores shared with other jobs

Random weights for the preset are written once to a temporary directory in Hugging Face
format; each (engine, dtype) is then measured in its own child process, which loads them,
so peak memory (max RSS) is that engine's alone and one engine's allocator state cannot slow
the next. Children inherit the caller's environment: spinning OpenMP threads (the default)
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
  is expected to touch under uniform routing, E(1 - (1 - K/E)^B)) over the measured copy
  bandwidth, times B.

Decode runs through the fused C step (engine/native) unless --no-native; the row says which.

Measured on the project's machine (2 vCPUs of an AMD EPYC, AVX2 only; 2 threads, load 1.2-1.9,
`--repeat 2`, best window): transformers float32 prefill 1,306, decode batch 1 26.3, batch 16
103.6 tokens/s; dsv2 float32 1,404 / 169.4 / 502.8 (1.08x / 6.43x / 4.85x), dsv2 int8
1,607 / 425.8 / 733.8 (1.23x / 16.2x / 7.09x), dsv2 bfloat16 302 / 232.0 / 496.0 (prefill 1,141
since it multiplies in float32 on CPUs without bf16 arithmetic, model/precision.py). The issue's
decode targets (6x at batch 1, 5x at batch 16, in the best dtype) are met with int8 weights,
and nearly with float32; the prefill target (3x) is not:
- prefill: both engines run the same GEMMs through the same MKL sgemm at 110-135 GFLOP/s (this
  CPU's fp32 rate), ~60% of the time; dsv2 saves the unfused attention (flash SDPA) and the
  prompt's logits. 3x needs a faster GEMM than fp32 on two AVX2 cores has: vLLM's 2.9x came
  from AMX bf16; without bf16 arithmetic, bf16 weights can at best match fp32 here (dsv2 widens
  them for prefill; transformers multiplies in bf16, ~5x slower).
- decode batch 1 is bound by the bytes of weights read: the fused float32 step reaches ~90%
  of the copy-bandwidth roofline; int8 rows read a quarter of those bytes.
- decode batch 16 is small-M matmuls (3 x 4 register tiles in the fused step): the whole step
  runs at 31 (float32) to 45 (int8) GFLOP/s, at 61 MFLOP per token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch


def _args(argv=None):
    p = argparse.ArgumentParser(prog="dsv2 bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p.parse_args(argv)


def add_arguments(p) -> None:
    p.add_argument("--preset", default="small", help="model preset (default small, the benchmark config)")
    p.add_argument("--dtypes", default="float32,bfloat16,int8",
                   help="comma list of float32, bfloat16, int8 (dsv2's int8 weights with float32 activations; "
                        "no peer row). Default: all three")
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", default="1,16", help="decode batch sizes (default 1,16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    p.add_argument("--repeat", type=int, default=1, help="interleaved rounds; best figure per engine (default 1)")
    p.add_argument("--compile", action="store_true", help="torch.compile dsv2's decode step")
    p.add_argument("--no-native", action="store_true",
                   help="decode with PyTorch ops instead of the fused C step (engine/native)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)


# ------------------------------------------------------------------ children
def _prompts(B: int, T: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(2, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _decode_rates(step, n_steps: int, tokens_per_step: int, window: int = 8) -> tuple[float, float, float]:
    """Time n_steps calls of step() -> (best tokens/s over a window of `window` consecutive steps,
    tokens/s over the whole run, tokens per CPU-second of this process over the run). The first
    step is a warm-up. On a machine shared with other jobs the best window and the CPU-time
    rate are the figures least disturbed by them; all three are reported."""
    step()
    times = []
    cpu = time.process_time()
    for _ in range(n_steps - 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    total = tokens_per_step * len(times)
    return _windows(times, tokens_per_step, window), total / sum(times), total / max(cpu, 1e-9)


def _best_time(fn, repeats: int = 5) -> tuple[float, float]:
    """-> (best wall seconds of one call, CPU seconds per call over all repeats)."""
    best, cpu = float("inf"), time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, (time.process_time() - cpu) / repeats


def _child_dsv2(path, dtype, a) -> dict:
    from .engine import Engine, Request
    from .llm import LLM
    from .sampling import SamplingParams
    native = False if a.get("no_native") else None
    llm = LLM(path, dtype=dtype, compile=a["compile"], quantize="int8" if a["dtype"] == "int8" else None,
              native=native)
    cfg = llm.model.config
    res = {}
    eng = Engine(llm.model, max_batch_slots=1, max_len=a["prefill_len"] + 8, compile=False)
    x = _prompts(1, a["prefill_len"], cfg.vocab_size, 0)[0].tolist()

    def prefill():
        eng.add(Request(x, SamplingParams(max_new_tokens=1)))
        eng.free(0)
        eng.cached_ids[0] = []  # no prefix reuse between repeats

    prefill()
    wall, cpu = _best_time(prefill)
    res["prefill_tok_s"], res["prefill_tok_cpu_s"] = a["prefill_len"] / wall, a["prefill_len"] / cpu
    for B in a["batches"]:
        eng = Engine(llm.model, max_batch_slots=B, max_len=a["prompt_len"] + a["new_tokens"] + 1,
                     compile=a["compile"], native=native)
        params = SamplingParams(max_new_tokens=a["new_tokens"], ignore_eos=True)
        for r in _prompts(B, a["prompt_len"], cfg.vocab_size, 1).tolist():
            eng.add(Request(r, params))
        eng.step()  # hands out the prefill tokens
        rates = _decode_rates(eng.step, a["new_tokens"] - 1, B)
        res[f"decode_b{B}_tok_s"], res[f"decode_b{B}_avg_tok_s"], res[f"decode_b{B}_tok_cpu_s"] = rates
        res["compiled"] = eng._decode.compiled
        res["fused"] = eng._decode.native is not None
    res["kv_bytes_per_token"] = eng.cache.bytes_per_token()
    return res


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


def _windows(times: list[float], tokens_per_step: int, window: int = 8) -> float:
    windows = [sum(times[i:i + window]) for i in range(0, len(times) - window + 1, window)] or [sum(times)]
    return tokens_per_step * min(window, len(times)) / min(windows)


def _child_peer(path, dtype, a) -> dict:
    """transformers as its users run it: generate(), greedy, EOS ignored; a streamer notes the
    time of each step so its decode is timed exactly like ours (Engine.step per token)."""
    from transformers import DeepseekV2ForCausalLM
    model = DeepseekV2ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    V = model.config.vocab_size
    res = {}
    x = _prompts(1, a["prefill_len"], V, 0)
    with torch.inference_mode():
        prefill = lambda: model(x, use_cache=True, logits_to_keep=1)  # noqa: E731 (as generate() prefills)
        prefill()
        wall, cpu = _best_time(prefill)
        res["prefill_tok_s"], res["prefill_tok_cpu_s"] = a["prefill_len"] / wall, a["prefill_len"] / cpu
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        for B in a["batches"]:
            xs = _prompts(B, a["prompt_len"], V, 1)
            model.generate(xs, max_new_tokens=4, **kw)  # warm-up
            clock = _StepClock()
            out = model.generate(xs, max_new_tokens=a["new_tokens"], min_new_tokens=a["new_tokens"],
                                 streamer=clock, return_dict_in_generate=True, **kw)
            # put() #0 is the prompt, #1 the prefill's token; then one per decode step. As for ours,
            # the first decode step is a warm-up.
            wall_t, cpu_t = clock.wall[2:], clock.cpu[2:]
            times = [b - a_ for a_, b in zip(wall_t, wall_t[1:])]
            res[f"decode_b{B}_tok_s"] = _windows(times, B)
            res[f"decode_b{B}_avg_tok_s"] = B * len(times) / sum(times)
            res[f"decode_b{B}_tok_cpu_s"] = B * len(times) / max(cpu_t[-1] - cpu_t[0], 1e-9)
        cache = out.past_key_values
        held = sum(t.numel() * t.element_size() for t in _tensors(cache))
        res["kv_bytes_per_token"] = held // (B * (a["prompt_len"] + a["new_tokens"] - 1))
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
    dtype = torch.float32 if a["dtype"] == "int8" else getattr(torch, a["dtype"])
    fn = _child_dsv2 if a["engine"] == "dsv2" else _child_peer
    res = fn(a["path"], dtype, a)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(res))


# -------------------------------------------------------------------- parent
def copy_bandwidth(mb: int = 256) -> float:
    """Bytes moved per second (read + write) by a large tensor copy, best of 5."""
    a = torch.ones(mb * 2**20 // 4)
    b = torch.zeros_like(a)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


def weight_bytes_per_step(model, B: int) -> float:
    """Bytes of weights one decode step of B tokens reads (routed experts by expected coverage)."""
    cfg = model.config
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed_tokens"):
            total += B * p.shape[1] * p.element_size()  # B rows looked up
        elif ".experts." in name and "shared" not in name:
            E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
            total += p.numel() * p.element_size() * (1 - (1 - K / E) ** B)
        else:
            total += p.numel() * p.element_size()
    return total


def run(args) -> int:
    if args.child:
        _child(args.child)
        return 0
    from ..checkpoint import save_pretrained
    from ..config import ModelConfig
    from ..model import DeepseekV2
    torch.set_num_threads(args.threads)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "int8"):
            raise ValueError(f"--dtypes takes float32, bfloat16 and/or int8, got {d!r}.")
    batches = [int(b) for b in args.batches.split(",")]
    cfg = ModelConfig.from_preset(args.preset)
    torch.manual_seed(0)
    model = DeepseekV2(cfg).eval()
    bw = copy_bandwidth()
    load = os.getloadavg()[0]
    print(f"dsv2 bench: preset {args.preset} ({model.num_params() / 1e6:.1f}M params, "
          f"{model.active_params() / 1e6:.1f}M active), {args.threads} threads, load avg {load:.2f}, "
          f"copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    rows, printed = {}, False
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        # Rounds interleave the engines so load changes on a shared machine hit both alike;
        # each figure is the best over rounds.
        for rnd in range(args.repeat):
            for dtype in dtypes:
                for engine in ["dsv2"] + ([] if args.no_peer or dtype == "int8" else ["transformers"]):
                    spec = dict(engine=engine, dtype=dtype, path=tmp, threads=args.threads, batches=batches,
                                prefill_len=args.prefill_len, prompt_len=args.prompt_len,
                                new_tokens=args.new_tokens, compile=args.compile, no_native=args.no_native)
                    res = _run_child(spec)
                    res.update(engine=engine, dtype=dtype, load=os.getloadavg()[0])
                    prev = rows.get((engine, dtype))
                    if prev is not None:
                        res = {k: max(v, prev[k]) if "tok_" in k else v for k, v in res.items()}
                    rows[(engine, dtype)] = res
                    if rnd == args.repeat - 1:
                        _print_row(res, batches, model, bw, header=not printed)
                        printed = True
    rows = list(rows.values())
    _print_ratios(rows, batches)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=rows, copy_bandwidth_gb_s=bw / 1e9, load=load), f, indent=1)
    return 0


def _run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "dsv2.engine.bench", "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{spec['engine']} {spec['dtype']} benchmark failed:\n{proc.stderr[-3000:]}")


def _print_row(r: dict, batches, model, bw: float, header: bool) -> None:
    if header:
        cols = ["engine", "dtype", "prefill tok/s"] + [f"decode b{b} tok/s best/avg (roofline %)" for b in batches]
        print(" | ".join(cols) + " | KV bytes/token | peak RSS MB | load")
    esz = {"float32": 4, "bfloat16": 2, "int8": 1}[r["dtype"]]  # int8: the matrices (most of the bytes)
    cells = [f"{r['engine']:<12}", f"{r['dtype']:<8}", f"{r['prefill_tok_s']:>9,.0f}"]
    for b in batches:
        roof = b * bw / (weight_bytes_per_step(model, b) * esz / 4)
        cells.append(f"{r[f'decode_b{b}_tok_s']:>7,.1f}/{r[f'decode_b{b}_avg_tok_s']:<7,.1f} "
                     f"({100 * r[f'decode_b{b}_tok_s'] / roof:4.1f}%)")
    cells += [f"{r['kv_bytes_per_token']:>8,}", f"{r['peak_rss_mb']:>7,.0f}", f"{r['load']:.1f}"]
    if r.get("compiled"):
        cells.append("(compiled decode)")
    elif r["engine"] == "dsv2":
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
