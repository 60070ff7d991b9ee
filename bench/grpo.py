"""GRPO learns a verifiable task, and coin-flip rewards of the same mean do not: curves and a table.

    .venv/bin/dsv2 demo                                       # the base model, once (runs/demo/pretrain/hf)
    .venv/bin/python bench/grpo.py                            # SFT start, then 3 seeds x (GRPO, control)
    .venv/bin/python bench/grpo.py --seeds 0 --steps 40 --out /tmp/grpo_bench

The toy task is three-digit sums, "What is 4 + 7 + 2?" -> "13" (1,000 triples; 200 held out,
never trained on). The SFT start learns from noisy labels: half of its training answers are
off by one (sum + 1), so it answers about half of the held-out sums right and most of the
rest one too high, and it samples the right answer often. From that one start each seed runs
- GRPO: presets/grpo/demo.yaml with the exact-match reward (the verifier the labels lacked);
- control: the same loop, same steps and rollouts, but each reward replaced by a coin flip
  with the probability of the batch's mean exact match (same mean reward, no signal).
Held-out greedy exact match is measured every --eval-every steps. Written under --out:
grpo_curves.png (held-out score against step, every run) and grpo_table.md (start, end,
gain and wall-clock of each run).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from dsv2.bench.common import cpu_name


def triples(seed: int = 0, held_out: int = 200):
    all_ = [(a, b, c) for a in range(10) for b in range(10) for c in range(10)]
    random.Random(seed).shuffle(all_)
    rows = [{"prompt": f"What is {a} + {b} + {c}?", "answer": str(a + b + c)} for a, b, c in all_]
    return rows[held_out:], rows[:held_out]


def noisy_sft(rows: list[dict], noise: float = 0.5, seed: int = 0) -> list[dict]:
    """SFT chats whose answers are off by one (sum + 1) with probability `noise`."""
    r = random.Random(seed)
    return [{"messages": [{"role": "user", "content": x["prompt"]}, {"role": "assistant", "content":
             x["answer"] if r.random() >= noise else str(int(x["answer"]) + 1)}]} for x in rows]


class CoinFlips:
    """The control reward: a coin with the batch's exact-match rate, so the mean reward matches GRPO's."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __call__(self, prompts, completions, answer=None, **_):
        from dsv2.align.rewards import exact_match
        p = sum(exact_match(prompts, completions, answer)) / len(completions)
        return [float(self.rng.random() < p) for _ in completions]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/demo/pretrain/hf")
    p.add_argument("--out", default="runs/bench_grpo")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--sft-steps", type=int, default=120)
    p.add_argument("--no-control", action="store_true")
    p.add_argument("overrides", nargs="*", help="dsv2 grpo overrides for every run")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_name()}", flush=True)

    from dsv2.align.demo import write_jsonl
    from dsv2.align.grpo_trainer import GRPOTrainer, load_grpo_config
    from dsv2.align.rewards import Rewards
    from dsv2.align.sft import SFTTrainer, load_sft_config
    out = Path(args.out)
    if not (Path(args.base) / "config.json").exists():
        raise SystemExit(f"no base model at {args.base}: run `make demo` first (or pass --base DIR).")
    train, held = triples()
    write_jsonl(out / "data" / "train.jsonl", train)
    write_jsonl(out / "data" / "val.jsonl", held)
    write_jsonl(out / "data" / "sft.jsonl", noisy_sft(train))
    t0 = time.time()
    sft = SFTTrainer(load_sft_config("demo", [f"init_from={args.base}", f"data.train={out / 'data' / 'sft.jsonl'}",
                                              "data.val=null", f"out_dir={out / 'sft'}", "epochs=0",
                                              f"steps={args.sft_steps}", "log_every=20"])).fit()
    print(f"SFT start: {args.sft_steps} steps in {time.time() - t0:.0f}s -> {sft['export']}", flush=True)
    runs = [("grpo", s) for s in args.seeds] + ([] if args.no_control else [("control", s) for s in args.seeds])
    curves, table = {}, []
    for kind, seed in runs:
        name = f"{kind} seed {seed}"
        cfg = load_grpo_config("demo", [f"init_from={sft['export']}", f"data.train={out / 'data' / 'train.jsonl'}",
                                        f"data.val={out / 'data' / 'val.jsonl'}", f"out_dir={out / kind / str(seed)}",
                                        f"seed={seed}", f"steps={args.steps}", f"eval_every={args.eval_every}",
                                        "export=false", *args.overrides])
        rewards = Rewards({"coin": 1.0}, extra={"coin": CoinFlips(seed)}) if kind == "control" else None
        t1 = time.time()
        tr = GRPOTrainer(cfg, rewards=rewards, print_fn=lambda *_: None)
        tr.fit()
        wall = time.time() - t1
        recs = [json.loads(l) for l in (out / kind / str(seed) / "metrics.jsonl").read_text().splitlines()]
        curve = [(0, tr.baseline)] + [(r["step"], r["val_score"]) for r in recs if r["kind"] == "val"]
        rewards_mean = statistics.mean(r["reward"] for r in recs if r["kind"] == "train")
        curves[name] = curve
        table.append((name, curve[0][1], curve[-1][1], rewards_mean, wall))
        print(f"{name}: held-out {100 * curve[0][1]:.1f}% -> {100 * curve[-1][1]:.1f}% in {wall:.0f}s", flush=True)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(*zip(*[(s, 100 * v) for s, v in curve]), "o-" if name.startswith("grpo") else "x--", label=name)
    ax.set(xlabel="GRPO step", ylabel="held-out exact match (%)", title="three-digit sums: GRPO vs coin-flip control")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "grpo_curves.png", dpi=110)
    lines = ["| run | held-out start | held-out end | gain (points) | mean train reward | wall-clock |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {100 * a:.1f}% | {100 * b:.1f}% | {100 * (b - a):+.1f} | {r:.3f} | {w:.0f}s |"
              for n, a, b, r, w in table]
    (out / "grpo_table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"curves: {out / 'grpo_curves.png'}; {len(held)} held-out sums, greedy; {time.time() - t0:.0f}s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
