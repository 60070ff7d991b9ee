"""Do the balance losses balance expert load? The same model trained with them off and on.

    OMP_WAIT_POLICY=PASSIVE python bench/balance.py                       # data: runs/demo/data (or built)
    OMP_WAIT_POLICY=PASSIVE python bench/balance.py --steps 200 --scales 0 1 10

Each run is `dsv2 pretrain --config tiny` with identical data, seed and schedule, and the
three balance coefficients (a1, a2, a3) = scale x the paper's (0.003, 0.05, 0.02); scale 0
turns them off. Token dropping is off in every run, so load is the router's choice alone.
Reported per run, from the tokens routed in the last `--window` steps:
- max/mean expert load: the busiest expert's tokens over the mean, averaged over MoE layers
  (1.0 = perfectly balanced);
- max/mean device-group load: the same over the D groups of device-limited routing;
- final train LM loss and val loss (nats).

Measured (shared 2-vCPU machine, `--data runs/demo/data --steps 100`):
    a1, a2, a3          max/mean expert  max/mean group  train loss  val loss
    0, 0, 0                   2.83            2.29          5.312      5.748
    0.003, 0.05, 0.02         1.34            1.06          5.311      5.713
    0.03, 0.5, 0.2            1.30            1.02          5.400      5.841
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from dsv2.bench.common import cpu_name

PAPER = (0.003, 0.05, 0.02)


def ensure_data(path: Path | None, tmp: Path) -> Path:
    if path and (path / "card.json").exists():
        return path
    from dsv2.data.bpe import train_tokenizer
    from dsv2.data.shards import prepare_shards
    train_tokenizer(None, tmp / "tok", vocab_size=4096, max_mb=4, verbose=False)
    prepare_shards(None, tmp / "tok", tmp / "data", max_mb=4, verbose=False)
    return tmp / "data"


def run(data_dir: Path, out: Path, scale: float, args) -> dict:
    from dsv2.train.config import load_config
    from dsv2.train.loop import Trainer
    a1, a2, a3 = (scale * a for a in PAPER)
    cfg = load_config("tiny", [
        f"data.dir={data_dir}", f"out_dir={out}", f"steps={args.steps}", "export=false", "moe.drop_tokens=false",
        f"moe.exp_bal={a1}", f"moe.dev_bal={a2}", f"moe.comm_bal={a3}", f"moe.load_every={args.window}",
        f"data.seq_len={args.seq}", "batch.micro_batch=8", "batch.start=8", "batch.final=8", "batch.ramp_tokens=0",
        "optim.warmup_steps=10", f"eval_every={args.steps}", f"save_every={args.steps}", f"log_every={args.steps // 4}",
    ] + args.overrides)
    tr = Trainer(cfg, print_fn=lambda s: print(f"  [{scale:g}x] {s}"))
    result = tr.fit()
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    load = [r for r in recs if r["kind"] == "load"][-1]
    share = torch.tensor(load["expert_share"])                       # [layers, experts]
    D = tr.rules.D
    group_share = share.view(share.shape[0], D, -1).sum(-1)
    train = [r for r in recs if r["kind"] == "train"][-1]
    return {"scale": scale, "coefficients": (a1, a2, a3),
            "max_over_mean_expert": float((share.amax(-1) / share.mean(-1)).mean()),
            "max_over_mean_group": float((group_share.amax(-1) / group_share.mean(-1)).mean()),
            "train_lm_loss": train["lm_loss_nats"], "val_loss": result["val_loss"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra pretrain overrides for every run")
    p.add_argument("--data", type=Path, default=Path("runs/demo/data"))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--window", type=int, default=20, help="load measured over the last this many steps")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 10.0],
                   help="multiples of the paper's coefficients (default 0 1 10)")
    args = p.parse_args(argv)
    print(f"CPU: {cpu_name()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = ensure_data(args.data, Path(tmp))
        rows = [run(data_dir, Path(tmp) / f"run_{s:g}", s, args) for s in args.scales]
    print(f"\nbalance losses off vs on: tiny preset, {args.steps} steps x 8 x {args.seq} tokens, no dropping; "
          f"load over the last {args.window} steps")
    print(f"{'a1, a2, a3':>24s} | max/mean expert | max/mean group | train loss | val loss")
    for r in rows:
        a = ", ".join(f"{c:g}" for c in r["coefficients"])
        print(f"{a:>24s} | {r['max_over_mean_expert']:15.2f} | {r['max_over_mean_group']:14.2f} | "
              f"{r['train_lm_loss']:10.3f} | {r['val_loss']:8.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
