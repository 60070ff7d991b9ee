"""What FP8 / int8 weights and a quantized latent cache cost in quality, on a trained checkpoint.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/deploy_quality.py runs/demo/pretrain/hf --data runs/demo/data
    ... --rows fp8:auto,auto:mixed --prompts 64 --window 256 --json out.json

For each row (weights : cache), in one run, against the unquantized model with a cache in its
own dtype (the first row):
- how far the logits of 4 held-out windows move (rms of the difference over the reference's);
- perplexity and bits per byte of the held-out split (the data folder's val shard, decoded to
  text and re-tokenized, as `dsv2 eval perplexity --text` reads a file), windows of --window
  tokens, each prefilled into a cache of the row's format so the score includes its rounding;
- greedy agreement over --prompts held-out prompts of 32 tokens, --new-tokens generated each:
  the mean fraction of tokens before the first divergence from the reference, and the share
  of continuations that are identical;
- passkey retrieval (the built-in task) with the filler sized to the longest context the
  engine's cache holds (min(context, 2048) minus the question), --passkey-docs documents;
- long-range recall, for models too small to answer the passkey question: a 64-token held-out
  span, other held-out text up to the longest context, then the span again; the share of the
  repeat's tokens (after its first) predicted greedily, which needs attention to reach back
  through the whole cache (what induction heads do), --passkey-docs sequences, at --window
  (the length the demo models train at) and at the longest context.
Weights: auto (the checkpoint's float dtype), int8 (per row, dsv2.quant.int8) or fp8 (128 x 128
blocks, dsv2.quant.fp8). Caches: engine/cache.py's formats.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dsv2.bench.common import cpu_name

DEFAULT_ROWS = "auto:auto,int8:auto,fp8:auto,auto:bfloat16,auto:fp8,auto:int8,auto:mixed,fp8:fp8,fp8:mixed"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a trained checkpoint directory (with tokenizer.json)")
    p.add_argument("--data", required=True, help="its data folder (dsv2 data): the val shard is the held-out text")
    p.add_argument("--rows", default=DEFAULT_ROWS, help=f"weights:cache pairs (default {DEFAULT_ROWS})")
    p.add_argument("--window", type=int, default=256, help="perplexity window (default 256)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--passkey-docs", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def held_out(data_dir: Path, tok) -> list[str]:
    """The val shard's documents as text (split at EOS)."""
    card = json.loads((data_dir / "card.json").read_text())
    ids = np.concatenate([np.fromfile(data_dir / s["file"], dtype=card["dtype"]) for s in card["shards"]["val"]])
    docs, cur = [], []
    for t in ids.tolist():
        if t == card["eos_id"]:
            if cur:
                docs.append(tok.decode(cur))
            cur = []
        elif t != card["bos_id"]:
            cur.append(t)
    if cur:
        docs.append(tok.decode(cur))
    return [d for d in docs if d.strip()]


@torch.inference_mode()
def logits_of(model, docs, window: int, kv: str | None, n: int = 4) -> torch.Tensor:
    """Logits over the first window of n held-out documents (through a cache of the format)."""
    from dsv2.eval.perplexity import through_cache
    x = torch.tensor([d.ids[:window] for d in docs if len(d.ids) >= window][:n])
    return model(x, **through_cache(model, x, kv))


@torch.inference_mode()
def recall(model, docs, context: int, n: int, kv: str | None, span: int = 64) -> float:
    """Greedy accuracy on the second copy of a span repeated at the far end of the context."""
    from dsv2.eval.perplexity import through_cache
    ids = [t for d in docs for t in d.ids]
    hits = total = 0
    for k in range(n):
        a = (k * 7919) % (len(ids) - context)
        first = ids[a: a + span]
        filler = ids[(a + context) % (len(ids) - context):][: context - 2 * span]
        x = torch.tensor([first + filler + first])
        logits = model(x, **through_cache(model, x, kv))[0]
        start = span + len(filler)
        pred = logits[start: start + span - 1].argmax(-1)
        hits += int((pred == x[0, start + 1: start + span]).sum())
        total += span - 1
    return hits / total


def load(path, weights: str):
    from dsv2 import load_pretrained
    w = None if weights == "auto" else weights
    return load_pretrained(path, quantize=w)


def main(argv=None) -> int:
    args = _args(argv)
    torch.set_num_threads(args.threads)
    from dsv2 import LLM, Tokenizer
    from dsv2.eval.perplexity import Document, perplexity
    from dsv2.eval.runner import run_task
    from dsv2.eval.tasks import load_task
    tok = Tokenizer(args.model)
    texts = held_out(Path(args.data), tok)
    docs = [Document(f"val[{i}]", t, tok.encode(t)) for i, t in enumerate(texts)]
    g = np.random.default_rng(0)
    long_docs = [d for d in docs if len(d.ids) > 40]
    picks = [(long_docs[i % len(long_docs)], int(g.integers(0, len(long_docs[i % len(long_docs)].ids) - 33)))
             for i in range(args.prompts)]
    prompts = [d.ids[s: s + 32] for d, s in picks]
    rows = [tuple(r.split(":")) for r in args.rows.split(",")]
    ref_model = load(args.model, "auto")
    context = min(ref_model.config.max_position_embeddings, 2048)
    passkey = load_task(f"passkey:dataset.args.length={context - 64}", tok)
    print(f"{args.model}: {ref_model.num_params() / 1e6:.1f}M parameters, {sum(len(d.ids) for d in docs):,} held-out "
          f"tokens in {len(docs)} documents; {args.prompts} greedy prompts x {args.new_tokens} tokens; passkey at "
          f"{context - 64} filler tokens ({args.passkey_docs} documents); {cpu_name()}", flush=True)
    results, ref, ref_logits = [], None, None
    for weights, cache in rows:
        t0 = time.perf_counter()
        model = ref_model if weights == "auto" else load(args.model, weights)
        kv = None if cache == "auto" else cache
        ppl = perplexity(model, docs, args.window, kv_cache_dtype=kv)
        llm = LLM(model, tokenizer=tok, kv_cache_dtype=kv, max_batch_slots=16)
        out = [o.token_ids for o in llm.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True)]
        if ref is None:
            ref = out
        agree = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), len(r)) / len(r) for o, r in zip(out, ref)]
        pk, _ = run_task(passkey, model, tok, limit=args.passkey_docs, llm=LLM(model, tokenizer=tok, kv_cache_dtype=kv),
                         progress=False)
        logits = logits_of(model, docs, args.window, kv)
        if ref_logits is None:
            ref_logits = logits
        drift = float((logits - ref_logits).norm() / ref_logits.norm())
        rec = recall(model, docs, context, args.passkey_docs, kv)
        rec_w = recall(model, docs, args.window, args.passkey_docs, kv)
        from dsv2.engine.cache import LatentCache
        bits = LatentCache(model.config, 1, 1, next(model.parameters()).dtype, kv_cache_dtype=kv).bits_per_element()
        r = {"weights": weights, "cache": cache, "cache_bits": bits, "ppl": ppl["ppl"], "logit_rms": drift,
             "bits_per_byte": ppl["bits_per_byte"],
             "greedy_agreement": float(np.mean(agree)), "identical": float(np.mean([a == 1.0 for a in agree])),
             "passkey": pk["exact_match"], "recall": rec, "recall_window": rec_w, "seconds": time.perf_counter() - t0}
        results.append(r)
        print(f"  {weights:>5} weights, {cache:>8} cache ({bits:5.2f} bits): ppl {r['ppl']:8.3f} logits {drift:6.2%} rms off "
              f"({r['bits_per_byte']:.4f} bpb)  greedy agreement {r['greedy_agreement']:6.1%}  identical "
              f"{r['identical']:6.1%}  passkey {r['passkey']:5.1%}  recall {r['recall_window']:5.1%} / {r['recall']:5.1%}  [{r['seconds']:.0f} s]",
              flush=True)
    base = results[0]
    print(f"\n| weights | cache (bits/element) | perplexity | Δ ppl | logits, rms off | greedy agreement | identical | "
          f"passkey @{context - 64} | recall @{args.window} | recall @{context} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['weights']} | {r['cache']} ({r['cache_bits']:.2f}) | {r['ppl']:.3f} | "
              f"{(r['ppl'] / base['ppl'] - 1):+.2%} | {r['logit_rms']:.2%} | {r['greedy_agreement']:.1%} | "
              f"{r['identical']:.1%} | {r['passkey']:.0%} | {r['recall_window']:.1%} | {r['recall']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
