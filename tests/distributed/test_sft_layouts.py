"""`dsv2 sft` on one process and on two (`--nproc 2 --ep 2`: FSDP2 + expert parallelism) trains alike.

The same global step of 4 packed rows: one process reads them as micro-batches of 2, each rank
of two reads 1 row per micro-batch. The loss is divided by the supervised tokens of the whole
global step (all-reduced) and padding counts nowhere, so per-step losses and the exported
weights agree.
"""

from __future__ import annotations

import json
import sys

from safetensors.torch import load_file

from .conftest import run_cmd


def test_two_processes_with_expert_parallelism_match_one(sft_base, chat_files, tmp_path):
    common = ["sft", "--config", "demo", f"init_from={sft_base}", f"data.train={chat_files / 'train.jsonl'}",
              f"data.val={chat_files / 'val.jsonl'}", "epochs=0", "steps=3", "data.seq_len=64", "batch.start=4",
              "batch.final=4", "precision=fp32", "threads=1", "log_every=1", "eval_every=100", "save_every=100",
              "optim.warmup_steps=1", "optim.lr=1e-3", "optim.eps=1e-6"]
    dsv2 = [sys.executable, "-m", "dsv2"]
    run_cmd([*dsv2, *common, f"out_dir={tmp_path / 'one'}", "batch.micro_batch=2"], timeout=120)
    run_cmd([*dsv2, *common, f"out_dir={tmp_path / 'two'}", "batch.micro_batch=1", "--nproc", "2", "--ep", "2"],
            timeout=240)

    def losses(run):
        rows = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["lm_loss_nats"] for r in rows if r["kind"] == "train"]
    one, two = losses("one"), losses("two")
    assert len(one) == len(two) == 3
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(one, two)), (one, two)
    a, b = load_file(tmp_path / "one" / "hf" / "model.safetensors"), load_file(tmp_path / "two" / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in a)
    assert worst <= 1e-5, worst
    assert (tmp_path / "two" / "hf" / "tokenizer_config.json").exists()
