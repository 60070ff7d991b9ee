"""Context extension, measured: no scaling, position interpolation, YaRN, and YaRN with a short
extension run, each on the same pretrained model, at 1, 2, 4 and 8 times its training length.

    .venv/bin/python bench/yarn_experiment.py --out runs/yarn-exp                 # 3 seeds, ~30 min each on 2 cores
    .venv/bin/python bench/yarn_experiment.py --out runs/yarn-exp --seeds 0 --steps 300   # a quick look

For each seed:
1. Data (once): a byte-level BPE (4,096) and token shards from this Python's standard library,
   with a shard of --passkey-docs passkey documents of exactly L0 tokens (~54% of the tokens),
   so that each is one whole training window (`add_passkey_shard`). They use the format of
   `dsv2 eval niah --passkey`: an instruction, filler sentences, "The pass key is NNNNN.
   Remember it. ..." at a random depth, the question, then the key. The extension's data has
   the same text and an eighth as many passkey documents of 4 L0 tokens. Twenty long stdlib
   modules are held out of training for perplexity.
   (An earlier version mixed in passkey documents of 100-160 tokens as ordinary files: the
   stream cut many of them apart, no needle was ever farther back than ~100 tokens, and the
   model never learned to retrieve at L0.)
2. Pretraining: `dsv2 pretrain --config demo` (the tiny preset) at seq_len L0 = 256, 2,000 steps.
3. Six arms, as config.json variants of that checkpoint, the weights shared:
   - (a) none: RoPE unchanged, the context raised to 8 L0 (+64 for the answer);
   - (b) PI: rope_scaling linear, factor 8, no training;
   - (c) YaRN: factor 8, beta 32/1, mscale 0.707, no training;
   - (d) YaRN + extension: (c)'s config, trained for --extend-steps (about 6% of pretraining)
     at 4 L0 with `dsv2 pretrain --config extend-yarn init_from=...` (its lr, 1e-3);
   - (e) the same extension at a third of that lr (3e-4), added after (d) came out below (c);
   - (f) the same-compute control for (e): as many steps and tokens at L0 with RoPE unchanged
     (lr 3e-4), then (c)'s YaRN config untrained.
4. Each arm is scored at L0, 2 L0, 4 L0 and 8 L0:
   - passkey accuracy over depths 0, 25, 50, 75, 100 with --trials 5-digit keys each, and the
     share of the key's digits in place (a softer score: the tiny model often copies most of a key);
   - perplexity of the held-out modules' same final 128 tokens with that much context.

Writes OUT/results.json; OUT/results.md, the tables: passkey exact match pooled over the seeds
with its 95% Wilson interval, perplexity as the mean over seeds with its 95% t interval, each with
the per-seed figures; a passkey heat map per arm and seed (OUT/seedS/niah/ARM/niah.png) and one
per arm with the seeds pooled (OUT/heatmaps/ARM.png). --report-only rebuilds the tables and the
pooled heat maps from the saved results. The write-up is docs/long-context.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

L0 = 256
FACTOR = 8
CONTEXT = FACTOR * L0 + 64     # max_position_embeddings of every arm: 8 L0 and the answer's tokens
LENGTHS = [L0, 2 * L0, 4 * L0, 8 * L0]
DEPTHS = [0, 25, 50, 75, 100]
KEY_DIGITS = 5    # the YaRN paper's passkey length; 7-digit keys (6 tokens here) the tiny model copied only in part
YARN = {"type": "yarn", "factor": FACTOR, "original_max_position_embeddings": L0, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
ARMS = {"a_none": None, "b_pi": {"type": "linear", "factor": FACTOR}, "c_yarn": YARN, "d_yarn_trained": YARN,
        "e_yarn_trained_lr3e-4": YARN, "f_control_then_yarn": YARN}
EXTEND_LR = {"d_yarn_trained": 1e-3, "e_yarn_trained_lr3e-4": 3e-4}   # extend-yarn's lr, and a third of it


def dsv2(*args) -> None:
    cmd = [sys.executable, "-m", "dsv2", *map(str, args)]
    print("$ dsv2 " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def make_data(out: Path, passkey_docs: int) -> tuple[Path, Path, list[Path]]:
    """Tokenizer, text shards, passkey shards, and the held-out modules.
    -> (the L0 data dir, the extension's 4 L0 data dir, the held-out files)."""
    from dsv2.data.bpe import train_tokenizer
    from dsv2.data.corpus import default_corpus
    from dsv2.data.shards import prepare_shards
    from dsv2.tokenizer import Tokenizer
    data, ext, held = out / "data", out / "data_ext", out / "held_out"
    if (data / "card.json").exists() and (ext / "card.json").exists():
        return data, ext, sorted(held.glob("*.py"))
    files = [p for p in default_corpus() if p.stat().st_size > 0]
    rng = random.Random(0)
    long = sorted((p for p in files if p.stat().st_size > 40_000), key=lambda p: p.name)
    held_files = rng.sample(long, 20)
    held.mkdir(parents=True, exist_ok=True)
    for p in held_files:
        shutil.copyfile(p, held / f"{p.parent.name}_{p.name}")
    train_files = [p for p in files if p not in held_files]
    tok_dir = out / "tok"
    train_tokenizer(train_files, tok_dir, vocab_size=4096, max_mb=8, verbose=False)
    tok = Tokenizer(tok_dir)
    prepare_shards(train_files, tok_dir, data, val_fraction=0.02, max_mb=16, verbose=False)
    ext.mkdir(parents=True, exist_ok=True)
    for f in data.glob("*.bin"):
        if not (ext / f.name).exists():
            (ext / f.name).symlink_to(f.resolve())
    shutil.copyfile(data / "card.json", ext / "card.json")
    # Passkey documents at 4 L0 for the extension: as many tokens as it trains on, ~37% of them.
    add_passkey_shard(tok, data, passkey_docs, L0, seed=1)
    add_passkey_shard(tok, ext, passkey_docs // 8, 4 * L0, seed=2)
    return data, ext, sorted(held.glob("*.py"))


def add_passkey_shard(tok, data: Path, n_docs: int, window: int, seed: int) -> None:
    """Append a shard of n_docs passkey documents of exactly `window` tokens each to data's card.

    Each is the `dsv2 eval niah --passkey` prompt with the needle at a random depth, the key and
    ".", then EOS (padded with EOS to the window). The loader cuts a shard into windows that
    start every seq_len tokens, so at seq_len = window every training window is one whole
    document: the question, its answer and the needle anywhere from the start of the window to
    the question. (Documents in the text stream are cut at arbitrary points; a retrieval example
    cut from its needle teaches guessing.) Keys are seeded apart from every evaluation key."""
    import numpy as np

    from dsv2.eval.niah import build_prompt, make_key
    rng = random.Random(seed)
    docs = np.empty((n_docs, window), dtype=np.uint16)
    for i in range(n_docs):
        key = make_key(1_000_000 * seed + i, "train", window, 0, 0, KEY_DIGITS)
        answer = tok.encode(" " + key + ".", add_bos=False) + [tok.eos_id]
        ids = build_prompt(tok, "passkey", window - len(answer), rng.randrange(0, 101), key).ids + answer
        docs[i] = ids + [tok.eos_id] * (window - len(ids))
    name = f"train_passkey_{window}.bin"
    docs.tofile(data / name)
    card = json.loads((data / "card.json").read_text())
    card["shards"]["train"].append({"file": name, "tokens": int(docs.size)})
    card["tokens"]["train"] += int(docs.size)
    card["documents"]["train"] += n_docs
    (data / "card.json").write_text(json.dumps(card, indent=2) + "\n")


def arm_dir(base: Path, dst: Path, rope_scaling) -> Path:
    """A checkpoint directory sharing base's weights and tokenizer, with a changed config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.name != "config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    cfg = json.loads((base / "config.json").read_text())
    cfg["rope_scaling"], cfg["max_position_embeddings"] = rope_scaling, CONTEXT
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def evaluate(ckpt: Path, held: list[Path], trials: int, out: Path, title: str) -> dict:
    from dsv2.engine import LLM
    from dsv2.eval.niah import run_niah, write_outputs
    from dsv2.eval.perplexity import context_curve, read_documents
    from dsv2.eval.runner import load_model
    model, tok = load_model(ckpt, dtype="float32")
    report = run_niah(LLM(model, tokenizer=tok, max_batch_slots=8), LENGTHS, DEPTHS, trials, seed=0, passkey=True,
                      progress=False, key_digits=KEY_DIGITS)
    write_outputs(report, out, title)
    passkey = {n: sum(r["correct"] for r in report["results"] if r["length"] == n) / (len(DEPTHS) * trials)
               for n in LENGTHS}
    digits = {n: sum(_digits_right(r) for r in report["results"] if r["length"] == n) / (len(DEPTHS) * trials)
              for n in LENGTHS}
    rows = context_curve(model, read_documents(held, tok), LENGTHS, tail=128)
    return {"passkey": passkey, "digits": digits, "ppl": {r["max_len"]: r["ppl"] for r in rows}}


def _digits_right(record: dict) -> float:
    """The share of the key's digits the answer's first number has in place (exact match scores 1)."""
    import re
    m = re.search(r"\d+", record["answer"])
    got = m.group(0) if m else ""
    return sum(a == b for a, b in zip(got, record["key"])) / len(record["key"])


def run_seed(seed: int, args, data: Path, ext_data: Path, held: list[Path]) -> dict:
    root = args.out / f"seed{seed}"
    base = root / "pretrain"
    if not (base / "hf" / "config.json").exists():
        dsv2("pretrain", "--config", "demo", f"data.dir={data}", f"out_dir={base}", f"steps={args.steps}",
             f"seed={seed}", "eval_every=100000", "save_every=100000", "log_every=50", "moe.load_every=100000")
    for arm, lr in EXTEND_LR.items():
        ext = root / ("extend" if arm == "d_yarn_trained" else f"extend_lr{lr:g}")
        if not (ext / "hf" / "config.json").exists():
            dsv2("pretrain", "--config", "extend-yarn", f"init_from={base / 'hf'}", f"data.dir={ext_data}", f"out_dir={ext}",
                 f"steps={args.extend_steps}", f"seed={seed}", f"model.max_position_embeddings={CONTEXT}",
                 "precision=fp32", f"optim.lr={lr}", f"model.rope_scaling.factor={FACTOR}",
                 f"model.rope_scaling.original_max_position_embeddings={L0}", f"data.seq_len={4 * L0}",
                 "eval_every=100000", "save_every=100000", "log_every=10")
    control = root / "control_l0"     # the same steps and tokens as (e), at L0 with RoPE unchanged
    if not (control / "hf" / "config.json").exists():
        dsv2("pretrain", "--config", "extend-yarn", f"init_from={base / 'hf'}", "model={}", f"data.dir={data}",
             f"out_dir={control}", f"steps={args.extend_steps}", f"seed={seed}", "precision=fp32", "optim.lr=3e-4",
             f"data.seq_len={L0}", "batch.micro_batch=16", "batch.start=16", "batch.final=16",
             "eval_every=100000", "save_every=100000", "log_every=10")
    results = {}
    for arm, rope in ARMS.items():
        if arm == "f_control_then_yarn":
            ckpt = arm_dir(control / "hf", root / "arms" / arm, rope)
        elif arm in EXTEND_LR:
            lr = EXTEND_LR[arm]
            ckpt = root / ("extend" if arm == "d_yarn_trained" else f"extend_lr{lr:g}") / "hf"
        else:
            ckpt = arm_dir(base / "hf", root / "arms" / arm, rope)
        t = time.time()
        results[arm] = evaluate(ckpt, held, args.trials, root / "niah" / arm, f"{arm}, seed {seed}")
        print(f"seed {seed} {arm}: passkey {results[arm]['passkey']}, ppl "
              f"{ {k: round(v, 3) for k, v in results[arm]['ppl'].items()} } ({time.time() - t:.0f}s)", flush=True)
    return results


# Two-sided 95% Student t quantiles by degrees of freedom (the normal's 1.96 beyond 10).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    mid, half = (p + z2 / (2 * n)) / (1 + z2 / n), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, mid - half), min(1.0, mid + half)


def mean_ci(xs: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t interval (0 for one value)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return m, T95.get(len(xs) - 1, 1.96) * sd / math.sqrt(len(xs))


# The comparisons the write-up makes: the extension against untrained YaRN, PI and the
# same-compute control, and against no scaling (at L0: what the extension costs there).
PAIRS = [("d_yarn_trained", "c_yarn"), ("e_yarn_trained_lr3e-4", "c_yarn"), ("d_yarn_trained", "b_pi"),
         ("e_yarn_trained_lr3e-4", "f_control_then_yarn"), ("d_yarn_trained", "a_none"),
         ("e_yarn_trained_lr3e-4", "a_none")]


def pooled_records(out: Path, seeds: list[int]) -> dict[str, list[dict]]:
    """Each arm's passkey records, every seed's in one list (read once for the tables and maps)."""
    return {arm: [r for s in seeds for r in json.loads((out / f"seed{s}" / "niah" / arm / "niah.json").read_text())
                  ["results"]] for arm in ARMS}


def tables(all_results: dict, pooled: dict[str, list[dict]]) -> str:
    """Markdown tables: passkey exact match pooled over seeds with its Wilson 95% interval (and
    each seed's figure), digits in place, and perplexity as the mean over seeds with its 95% t
    interval (and each seed's figure)."""
    seeds = sorted(all_results)
    head = "| arm | " + " | ".join(f"{n} ({n // L0} L0)" for n in LENGTHS) + " |\n|---|" + "---|" * len(LENGTHS)
    lines = [f"\npasskey exact match, pooled over seeds {', '.join(map(str, seeds))} (95% Wilson interval of "
             f"the pooled prompts, which leaves out how much the seeds differ; per seed in brackets)\n", head]
    for arm in ARMS:
        recs = pooled[arm]
        cells = []
        for n in LENGTHS:
            hits = [r["correct"] for r in recs if r["length"] == n]
            lo, hi = wilson(sum(hits), len(hits))
            per = ", ".join(f"{all_results[s][arm]['passkey'][n]:.0%}" for s in seeds)
            cells.append(f"{sum(hits) / len(hits):.0%} ({lo:.0%}-{hi:.0%}) [{per}]")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["\npasskey, paired differences within each seed (the arms of a seed share its pretrained "
              "model): mean over seeds in points, +- 95% t interval, per seed in brackets\n",
              head.replace("| arm |", "| difference |")]
    for a, b in PAIRS:
        cells = []
        for n in LENGTHS:
            diffs = [100 * (all_results[s][a]["passkey"][n] - all_results[s][b]["passkey"][n]) for s in seeds]
            m, h = mean_ci(diffs)
            cells.append(f"{m:+.0f} +- {h:.0f} [{', '.join(f'{d:+.0f}' for d in diffs)}]")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    for metric, fmt, title in (("digits", "{:.0%}", "key digits in place"), ("ppl", "{:.1f}", "held-out perplexity")):
        lines += [f"\n{title}, mean over seeds (+- 95% t interval; per seed in brackets)\n", head]
        for arm in ARMS:
            cells = []
            for n in LENGTHS:
                vals = [all_results[s][arm][metric][n] for s in seeds]
                m, h = mean_ci(vals)
                per = ", ".join(fmt.format(v) for v in vals)
                cells.append(f"{fmt.format(m)} +- {fmt.format(h)} [{per}]")
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pooled_heatmaps(all_results: dict, pooled: dict[str, list[dict]], out: Path) -> list[Path]:
    """One passkey heat map per arm, length x depth, every seed's prompts pooled."""
    from dsv2.eval.niah import plot_heatmap
    seeds = sorted(all_results)
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    paths = []
    for arm in ARMS:
        recs = pooled[arm]
        cells = {}
        for n in LENGTHS:
            for d in DEPTHS:
                hits = [r["correct"] for r in recs if r["length"] == n and r["depth"] == d]
                cells[f"{n}x{d}"] = sum(hits) / len(hits)
        report = {"lengths": LENGTHS, "depths": DEPTHS, "cells": cells, "mode": "passkey", "results": recs,
                  "accuracy": sum(r["correct"] for r in recs) / len(recs), "seed": ", ".join(map(str, seeds))}
        paths.append(plot_heatmap(report, out / "heatmaps" / f"{arm}.png", f"{arm}, seeds pooled"))
    return paths


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/yarn-exp"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=2000, help="pretraining steps (default 2000; the demo runs 560)")
    p.add_argument("--extend-steps", type=int, default=120, help="YaRN extension steps (default 120, 6%%)")
    p.add_argument("--trials", type=int, default=10,
                   help="passkey keys per (length, depth) (default 10: 50 prompts per length and arm)")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the tables and pooled heat maps from OUT/results.json and the saved records")
    p.add_argument("--passkey-docs", type=int, default=10000,
                   help="passkey documents of L0 tokens in the pretraining data (default 10,000: ~54%% of its tokens)")
    args = p.parse_args()
    from dsv2.bench.common import cpu_name
    print(f"CPU: {cpu_name()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        all_results = {int(s): {arm: {k: {int(n): v for n, v in d.items()} for k, d in r.items()}
                                for arm, r in res.items()}
                       for s, res in saved.items() if int(s) in seeds}
    else:
        data, ext_data, held = make_data(args.out, args.passkey_docs)
        all_results = {}
        for seed in seeds:
            all_results[seed] = run_seed(seed, args, data, ext_data, held)
            (args.out / "results.json").write_text(json.dumps({str(k): v for k, v in all_results.items()}, indent=1))
    pooled = pooled_records(args.out, sorted(all_results))
    md = tables(all_results, pooled)
    (args.out / "results.md").write_text(md)
    pooled_heatmaps(all_results, pooled, args.out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
