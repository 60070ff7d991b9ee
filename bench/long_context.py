"""Long-context inference with YaRN: prefill time, decode tokens/s and cache bytes at 4K, 16K and 32K
tokens of context, dsv2 beside transformers on the same weights.

    .venv/bin/python bench/long_context.py                         # small preset, 512 to 32K, ~25 min
    .venv/bin/python bench/long_context.py --lengths 4096,8192 --new-tokens 8 --no-peer
    .venv/bin/python bench/long_context.py --lengths 512,2048,8192 --dtypes float32,bfloat16 --no-peer

The `small` preset with random weights and DeepSeek-V2's YaRN settings scaled to it (factor 8 over
its 4,096-token context: max_position_embeddings 32,768 + room for the new tokens) is written in
Hugging Face format once. Each (engine, length) runs in its own process (peak RSS is its own):
- dsv2 (each of --dtypes: the weights and the latent cache in that dtype): an Engine of one slot;
  the prompt is prefilled in chunks of 2,048 tokens (each chunk attends to the latent cache written
  so far), then --new-tokens are decoded greedily through the fused step, which reads c^KV and k^R
  straight from the cache (absorbed attention).
- transformers: DeepseekV2ForCausalLM (sdpa), one forward over the prompt with use_cache, then
  the same number of greedy steps with its cache.
Reported per length:
- prefill seconds;
- decode tokens/s (the best window of 4 steps, and the whole run);
- cache bytes: dsv2's latent rows for the context, transformers' key/value tensors after prefill;
- the peak RSS of the process.
dsv2's decode reads the weights once per step plus the context's latent rows, so its time per
token grows with context only by those reads. The roofline column is that: bytes of weights a
batch-1 step reads (common.weight_bytes_per_step) plus the context's cache rows, over the copy
bandwidth the same process measured just before decoding (this machine's bandwidth drifts by up to
1.5x from minute to minute), against the measured decode rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from dsv2.bench.common import best_window, copy_bandwidth, cpu_name, run_child, weight_bytes_per_step

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GiB = 2**30


def make_checkpoint(path: Path, max_len: int) -> None:
    import torch

    from dsv2.bench.common import _bpe_tokenizer
    from dsv2.checkpoint import save_pretrained
    from dsv2.config import ModelConfig
    from dsv2.model import DeepseekV2
    yarn = {"type": "yarn", "factor": 8, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 0.707, "mscale_all_dim": 0.707}
    cfg = ModelConfig.from_preset("small", max_position_embeddings=max_len, rope_scaling=yarn)
    model = DeepseekV2(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    path.mkdir(parents=True, exist_ok=True)
    _bpe_tokenizer(path, min(cfg.vocab_size, 4096))
    save_pretrained(model.eval(), path, tokenizer_dir=path)


def _child(spec: dict) -> dict:
    import torch

    from dsv2.bench.common import random_prompts
    torch.set_num_threads(spec["threads"])
    L, n = spec["length"], spec["new_tokens"]
    prompt = random_prompts(1, L, 4096, 0)
    times, step_bytes, bandwidth = [], None, None
    dtype = getattr(torch, spec["dtype"])
    if spec["engine"] == "dsv2":
        from dsv2.checkpoint import load_pretrained
        from dsv2.engine import Engine, Request
        from dsv2.engine.sampling import SamplingParams
        model = load_pretrained(spec["model"], dtype=dtype)
        eng = Engine(model, max_batch_slots=1, max_len=L + n + 1)
        t = time.perf_counter()
        eng.add(Request(prompt[0].tolist(), SamplingParams(max_new_tokens=n + 1, ignore_eos=True)))
        eng.step()
        prefill = time.perf_counter() - t
        bandwidth = copy_bandwidth()
        for _ in range(n):
            t = time.perf_counter()
            eng.step()
            times.append(time.perf_counter() - t)
        cache = eng.cache.bytes_per_token() * L
        fused = eng._decode.native is not None
        step_bytes = weight_bytes_per_step(model, 1) + cache
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=dtype,
                                                     attn_implementation="sdpa").eval()
        with torch.no_grad():
            t = time.perf_counter()
            out = model(prompt, use_cache=True)
            prefill = time.perf_counter() - t
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            cache = sum(x.numel() * x.element_size() for layer in _layers(past) for x in layer)
            for _ in range(n):
                t = time.perf_counter()
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                times.append(time.perf_counter() - t)
        fused = False
    return {"engine": spec["engine"], "dtype": spec["dtype"], "length": L, "step_bytes": step_bytes,
            "bandwidth": bandwidth,
            "prefill_s": prefill, "decode_tok_s": best_window(times, 1, 4),
            "decode_avg_tok_s": len(times) / sum(times), "cache_bytes": cache, "fused": fused,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB}


def _layers(past):
    """A transformers cache (DynamicCache, or the legacy tuple) -> per-layer (key, value) tensors."""
    if hasattr(past, "layers"):
        return [(lay.keys, lay.values) for lay in past.layers]
    if hasattr(past, "key_cache"):
        return list(zip(past.key_cache, past.value_cache))
    return [tuple(x) for x in past]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="512,2048,8192,32768")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="dsv2's weight and cache dtypes (default float32,bfloat16)")
    p.add_argument("--peer-dtype", default="float32", help="transformers' dtype (default float32)")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-peer", action="store_true", help="dsv2 only")
    p.add_argument("--json", default=None)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
        return 0
    lengths = [int(x) for x in args.lengths.split(",")]
    runs = [("dsv2", d) for d in args.dtypes.split(",")] + ([] if args.no_peer else [("transformers", args.peer_dtype)])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "small-yarn"
        make_checkpoint(ckpt, max(lengths) + args.new_tokens + 64)
        for L in lengths:
            for engine, dtype in runs:
                spec = dict(engine=engine, dtype=dtype, length=L, new_tokens=args.new_tokens, threads=args.threads,
                            model=str(ckpt))
                try:
                    r = run_child(__file__, spec)
                except RuntimeError as e:   # transformers at 32K asks for more memory than this machine has
                    print(f"{engine} at {L}: failed: {str(e).strip().splitlines()[-1]}", flush=True)
                    continue
                rows.append(r)
                print(json.dumps(r), flush=True)
    print(f"\n{cpu_name()}, {args.threads} threads")
    print(f"{'length':>8} {'engine':<13}{'dtype':<10}{'prefill s':>10}{'decode tok/s':>14}{'(avg)':>8}"
          f"{'roofline (GB/s)':>17}{'cache MB':>10}{'peak GiB':>10}")
    for r in rows:
        roof = f"{100 * r['decode_tok_s'] * r['step_bytes'] / r['bandwidth']:.0f}% of {r['bandwidth'] / 1e9:.0f}" \
            if r["step_bytes"] else "-"
        print(f"{r['length']:>8} {r['engine']:<13}{r['dtype']:<10}{r['prefill_s']:>10.1f}{r['decode_tok_s']:>14.2f}"
              f"{r['decode_avg_tok_s']:>8.2f}{roof:>17}{r['cache_bytes'] / 1e6:>10.1f}{r['peak_rss_gib']:>10.2f}")
    by = {(r["engine"], r["dtype"], r["length"]): r for r in rows}
    for L in lengths:
        b = by.get(("transformers", args.peer_dtype, L))
        for d in args.dtypes.split(","):
            a = by.get(("dsv2", d, L))
            if a and b:
                print(f"{L:>8}: dsv2 {d} against transformers {args.peer_dtype}: prefill "
                      f"{b['prefill_s'] / a['prefill_s']:.1f}x faster, "
                      f"decode {a['decode_tok_s'] / b['decode_tok_s']:.1f}x, "
                      f"cache {b['cache_bytes'] / a['cache_bytes']:.1f}x smaller")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
