"""The decode step three ways, same weights, same run: PyTorch eager, torch.compile (one graph,
fullgraph=True) and the fused C step (`torch.ops.dsv2.decode_step`).

    .venv/bin/python bench/compiled_decode.py                       # small preset, float32 and bfloat16
    .venv/bin/python bench/compiled_decode.py --dtypes float32 --cases 1:512,16:512

Each case B:S decodes B sequences whose caches hold S tokens (random latents: the cost of a
step does not depend on their values), and reports tokens/s as the best window of 8 steps.
The compiled step's first call (compilation) is timed apart; shapes are dynamic, so later
cases reuse the graph. The decision it informs: keep a hand-written kernel only where it
beats the compiled graph by more than 1.5x.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsv2.bench.common import cpu_name, decode_rates
from dsv2.config import ModelConfig
from dsv2.engine import Engine
from dsv2.model import DeepseekV2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--cases", default="1:512,16:512,64:512,1:8192,16:8192",
                   help="batch:context pairs (default 1:512,16:512,64:512,1:8192,16:8192)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cases = [tuple(map(int, c.split(":"))) for c in args.cases.split(",")]
    cfg = ModelConfig.from_preset(args.preset)
    longest = max(s for _, s in cases) + args.steps + 2
    if longest > cfg.max_position_embeddings:   # YaRN past the preset's context, as a long-context model has
        factor = -(-longest // cfg.max_position_embeddings)
        cfg = ModelConfig.from_preset(args.preset, max_position_embeddings=factor * cfg.max_position_embeddings,
                                      rope_scaling={"type": "yarn", "factor": factor,
                                                    "original_max_position_embeddings": cfg.max_position_embeddings})
    torch.manual_seed(0)
    base = DeepseekV2(cfg).eval()
    print(f"{cpu_name()}, {args.threads} threads, torch {torch.__version__}, preset {args.preset}")
    rows = []
    engines = {"eager": dict(native=False), "compiled": dict(compile=True, native=False), "fused C": dict(native=True)}
    for dtype in args.dtypes.split(","):
        model = base.to(getattr(torch, dtype))
        for name, kw in engines.items():
            for S in sorted({s for _, s in cases}):
                # One engine (one compiled step) per context length, its slots the largest batch.
                batches = [b for b, s in cases if s == S]
                eng = Engine(model, max_batch_slots=max(batches), max_len=S + args.steps + 2, **kw)
                for j in eng.cache.joint:
                    j.normal_()
                for B in batches:
                    pos, tokens = [S] * B, torch.randint(2, cfg.vocab_size, (B, 1))

                    def step():
                        with torch.inference_mode():
                            eng._decode(tokens, pos, S + 1, eng.cache, B)
                    t = time.perf_counter()
                    step()
                    first = time.perf_counter() - t
                    best, avg, _ = decode_rates(step, args.steps, B)
                    rows.append(dict(dtype=dtype, engine=name, batch=B, context=S, tok_s=best, avg_tok_s=avg,
                                     first_call_s=first))
                    print(f"  {dtype:9s} {name:9s} B={B:3d} S={S:5d}: {best:8.1f} tok/s (run avg {avg:.1f}, "
                          f"first call {first:.2f} s)", flush=True)

    print("\n| dtype | batch | context | eager tok/s | compiled tok/s | fused C tok/s | C / compiled |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        for B, S in cases:
            r = {x["engine"]: x["tok_s"] for x in rows if x["dtype"] == dtype and x["batch"] == B and x["context"] == S}
            print(f"| {dtype} | {B} | {S} | {r['eager']:.1f} | {r['compiled']:.1f} | {r['fused C']:.1f} "
                  f"| {r['fused C'] / r['compiled']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(cpu=cpu_name(), threads=args.threads, torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
