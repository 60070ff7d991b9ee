"""Decode speed over each latent-cache format at a long context, same model, same run.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/kv_cache_speed.py                 # small, 4K, batch 1 and 4
    .venv/bin/python bench/kv_cache_speed.py --context 4096 --batches 1,4 --formats bfloat16,fp8,int8,mixed --no-native

The `small` preset with random weights in --dtype; every slot's cache is filled to --context
positions with random latents written in the format (decode speed does not depend on their
values, and a 4K prefill per format would dominate the run), then --rounds rounds each
run --steps decode steps per format, interleaved, through the engine's decode step (the fused
C step unless --no-native), each writing its row and attending to every cached position.
Reported: the best window of 8 consecutive steps over the rounds and the whole-run average, in
tokens/s, with each format's ratio to the first (bfloat16).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="the weights' dtype")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--formats", default="bfloat16,fp8,int8,mixed")
    p.add_argument("--steps", type=int, default=24, help="decode steps per format per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the formats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-native", action="store_true", help="PyTorch-op decode (it widens the window per layer)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _args(argv)
    from dsv2.bench.common import cpu_name
    print(f"CPU: {cpu_name()}", flush=True)
    torch.set_num_threads(args.threads)
    from dsv2 import DeepseekV2, ModelConfig
    from dsv2.engine.cache import LatentCache
    from dsv2.engine.decode import DecodeStep
    cfg = ModelConfig.from_preset(args.preset, max_position_embeddings=max(
        4096, args.context + args.rounds * (args.steps + 3) + 1))
    torch.manual_seed(0)
    model = DeepseekV2(cfg).to(getattr(torch, args.dtype)).eval()
    step = DecodeStep(model, native=False if args.no_native else None)
    formats = [f.strip() for f in args.formats.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    print(f"decode over a {args.context}-token latent cache: preset {args.preset} ({args.dtype} weights), "
          f"{'fused C step' if step.native is not None else 'PyTorch ops'}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'batch':>5} {'cache':<9} {'bytes/token':>11} {'best tok/s':>11} {'avg tok/s':>10} {'vs first':>9}")
    for B in batches:
        caches = {}
        for f in formats:
            cache = LatentCache(cfg, B, args.context + args.rounds * (args.steps + 3) + 1,
                                model.embed_tokens.weight.dtype, kv_cache_dtype=f)
            g = torch.Generator().manual_seed(1)
            for view in cache.layers():   # random latents, stored in the format
                x = torch.randn(B, args.context, cache.C + cache.R, generator=g)
                view.store(torch.arange(args.context)[None].expand(B, -1), x[..., : cache.C], x[..., cache.C:])
            caches[f] = cache
        tokens = torch.randint(2, cfg.vocab_size, (B, 1))
        best = {f: 0.0 for f in formats}
        total = {f: [0.0, 0] for f in formats}
        pos = {f: args.context for f in formats}
        # Rounds interleave the formats, so a change in the machine's load hits them alike; each
        # format's figure is its best window of 8 steps over all rounds.
        with torch.inference_mode():
            for _ in range(args.rounds):
                for f in formats:
                    times = []
                    for s in range(args.steps + 3):
                        t0 = time.perf_counter()
                        step(tokens, [pos[f]] * B, pos[f] + 1, caches[f], B)
                        times.append(time.perf_counter() - t0)
                        pos[f] += 1
                    times = times[3:]
                    best[f] = max(best[f], max(8 * B / sum(times[i: i + 8]) for i in range(len(times) - 7)))
                    total[f][0] += sum(times)
                    total[f][1] += len(times) * B
        for f in formats:
            print(f"{B:>5} {f:<9} {caches[f].bytes_per_token():>11,} {best[f]:>11.1f} "
                  f"{total[f][1] / total[f][0]:>10.1f} {best[f] / best[formats[0]]:>8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
