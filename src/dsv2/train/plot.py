"""`dsv2 plot RUN_DIR`: PNG pictures of a run from its metrics.jsonl.

    dsv2 plot runs/demo/pretrain          # -> runs/demo/pretrain/plots/*.png

loss.png (train and val loss, with the tokenizer's unigram baseline when the data card is
found), reward.png (RL runs: the mean reward and the held-out score), lr.png, balance.png (each balance loss, per layer, and the drop rate) and
expert_load.png (a heat map of each MoE layer's share of tokens per expert over time:
balanced routing is an even colour).
"""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import read_metrics


def plot_run(run_dir: str | Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    run = Path(run_dir)
    mfile = run / "metrics.jsonl"
    if not mfile.exists():
        raise FileNotFoundError(f"no metrics.jsonl in {run}: give the out_dir of a `dsv2 pretrain` run.")
    recs = read_metrics(mfile)
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    load = [r for r in recs if r["kind"] == "load"]
    out = run / "plots"
    out.mkdir(exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["lm_loss_nats"] for r in train], label="train (LM)")
    val_loss = [(r["step"], r["val_loss_nats"]) for r in val if "val_loss_nats" in r]
    if val_loss:
        ax.plot(*zip(*val_loss), "o-", label="val")
    baseline = _unigram_baseline(run)
    if baseline:
        ax.axhline(baseline, ls="--", c="gray", label=f"unigram baseline {baseline:.2f}")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()
    save(fig, "loss.png")

    if any("reward" in r for r in train):      # an RL run (dsv2 grpo): rewards and the held-out score
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in train if "reward" in r], [r["reward"] for r in train if "reward" in r],
                label="train reward (mean)")
        scores = [(r["step"], r["val_score"]) for r in val if "val_score" in r]
        if scores:
            ax.plot(*zip(*scores), "o-", label="held-out score (greedy)")
        ax.set(xlabel="step", ylabel="reward", title="rewards")
        ax.legend()
        save(fig, "reward.png")

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in train], [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    save(fig, "lr.png")

    keys = [k for k in ("exp_bal", "dev_bal", "comm_bal") if any(k in r for r in train)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot([r["step"] for r in train if k in r], [r[k] for r in train if k in r], label=k)
    drops = [(r["step"], r["drop_rate"]) for r in train if r.get("drop_rate") is not None]
    if drops:
        ax2 = ax.twinx()
        ax2.plot(*zip(*drops), c="gray", alpha=0.5, label="drop rate")
        ax2.set_ylabel("dropped token copies")
    ax.set(xlabel="step", ylabel="loss per MoE layer", title="balance losses (= coefficient when balanced)")
    if keys:
        ax.legend(loc="upper right")
    save(fig, "balance.png")

    if load:
        share = np.array([r["expert_share"] for r in load])   # [time, layer, expert]
        n_layers = share.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.6 * n_layers + 0.8), squeeze=False)
        steps = [r["step"] for r in load]
        for li in range(n_layers):
            a = axes[li, 0]
            im = a.imshow(share[:, li].T, aspect="auto", origin="lower", cmap="viridis",
                          extent=(steps[0], steps[-1], -0.5, share.shape[2] - 0.5))
            a.set_ylabel(f"MoE {li}\nexpert")
            fig.colorbar(im, ax=a, label="share")
        axes[-1, 0].set_xlabel("step")
        axes[0, 0].set_title("tokens per expert (share of the layer's routed tokens) over time")
        save(fig, "expert_load.png")
    return written


def _unigram_baseline(run: Path) -> float | None:
    cfg = run / "config.yaml"
    if not cfg.exists():
        return None
    import yaml
    data_dir = (yaml.safe_load(cfg.read_text()) or {}).get("data", {}).get("dir")
    card = Path(data_dir or "", "card.json")
    return json.loads(card.read_text()).get("unigram_val_loss") if card.exists() else None


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="draw a pretraining run's curves and expert-load heat map",
                       description="Write PNGs (loss, lr, balance losses, expert load) from RUN_DIR/metrics.jsonl "
                                   "into RUN_DIR/plots.")
    p.add_argument("run_dir", help="the out_dir of a `dsv2 pretrain` run")
    p.set_defaults(func=_run)


def _run(args) -> int:
    for path in plot_run(args.run_dir):
        print(path)
    return 0
