"""Does SFT learn the skills? Held-out exact match over seeds, beside a same-compute control.

    .venv/bin/dsv2 demo                                  # the base model, once (runs/demo/pretrain/hf)
    .venv/bin/python bench/sft_learning.py               # 3 seeds + the control, ~4 min each on 2 cores
    .venv/bin/python bench/sft_learning.py --seeds 0 --base runs/demo/pretrain/hf

Every run fine-tunes the same base model with presets/sft/demo.yaml on the demo instruction
set (align/instructions.py) and scores the same 250 held-out chats, greedy:
- base: the model before fine-tuning;
- sft, one run per seed (the seed orders the rows and seeds the run);
- control, seed 0: the same steps on the same prompts, but with each answer moved to
  another chat of its kind (the answers no longer follow from the prompts). It spends the
  same compute and learns the format and the answer vocabulary; only the skill is missing.
Reported: held-out exact match, the share of answers that stop at EOS, and the held-out
answer loss at the end.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path


def shuffled_answers(chats: list[dict], seed: int = 0) -> list[dict]:
    """Each chat keeps its prompt and gets the answer of a random chat of the same kind."""
    r = random.Random(seed)
    by_kind: dict[str, list[int]] = {}
    for i, c in enumerate(chats):
        by_kind.setdefault(c["kind"], []).append(i)
    out = [dict(c) for c in chats]
    for idx in by_kind.values():
        answers = [chats[i]["answer"] for i in idx]
        r.shuffle(answers)
        for i, a in zip(idx, answers):
            user = chats[i]["messages"][0]
            out[i] = {**chats[i], "messages": [user, {"role": "assistant", "content": a}], "answer": a}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/demo/pretrain/hf")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--no-control", action="store_true")
    p.add_argument("overrides", nargs="*", help="dsv2 sft overrides for every run")
    args = p.parse_args(argv)
    from dsv2.bench.common import cpu_name
    print(f"CPU: {cpu_name()}", flush=True)

    from dsv2.align.demo import exact_match, write_jsonl
    from dsv2.align.instructions import instruction_set
    from dsv2.align.sft import SFTTrainer, load_sft_config
    tmp = Path(tempfile.mkdtemp(prefix="dsv2_sft_learning_"))
    train, held = instruction_set()
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "control.jsonl", shuffled_answers(train))
    write_jsonl(tmp / "val.jsonl", held)
    rows = [("base", exact_match(args.base, held), None)]
    runs = [(f"sft seed {s}", "train.jsonl", s) for s in args.seeds]
    if not args.no_control:
        runs.append(("control seed 0", "control.jsonl", 0))
    for name, data, seed in runs:
        cfg = load_sft_config("demo", [f"init_from={args.base}", f"data.train={tmp / data}",
                                       f"data.val={tmp / 'val.jsonl'}", f"out_dir={tmp / name.replace(' ', '_')}",
                                       f"seed={seed}", *args.overrides])
        result = SFTTrainer(cfg, print_fn=lambda *_: None).fit()
        rows.append((name, exact_match(result["export"], held), result["val_loss"]))
        print(f"{name}: exact match {100 * rows[-1][1]['exact_match']:.1f}%", flush=True)
    print(f"\n{len(held)} held-out chats, greedy; base {args.base}")
    print(f"{'run':16s} {'exact match':>12s} {'stops at EOS':>13s} {'val loss':>9s}   by kind")
    for name, em, val in rows:
        kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in em["by_kind"].items())
        print(f"{name:16s} {100 * em['exact_match']:11.1f}% {100 * em['stopped']:12.0f}% "
              f"{'' if val is None else f'{val:9.3f}':>9s}   {kinds}")
    sft = [em["exact_match"] for name, em, _ in rows if name.startswith("sft")]
    if len(sft) > 1:
        print(f"sft over {len(sft)} seeds: {100 * statistics.mean(sft):.1f}% +- {100 * statistics.stdev(sft):.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
