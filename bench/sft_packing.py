"""SFT throughput: packed rows beside the same examples one per row (padded), same run.

    .venv/bin/python bench/sft_packing.py                          # tiny preset, 600 chats, seq 512
    .venv/bin/python bench/sft_packing.py --preset small --steps 6 --seq 1024
    .venv/bin/python bench/sft_packing.py --device cuda --preset small --seq 4096 --rows 16

A random checkpoint of the preset (with a byte-level BPE) is written once, and chats with
lengths spread as real SFT data's are (log-normal, 20 to ~seq tokens, one to three turns)
are generated. Both runs are `SFTTrainer.train_step`, the same config except data.packing:
- packed: best-fit-decreasing rows of seq tokens, block-diagonal attention;
- padded: one chat per row, each micro-batch cut to its longest chat (dynamic padding, the
  stronger baseline: padding every row to seq would waste more).
Each does a warm-up step, then --steps timed optimizer steps of --rows rows, interleaved
round by round so machine load hits both alike. Reported: real (non-padding) tokens per
second, the padding fraction of what went through the model, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

WORDS = ("the model routes each token to a few experts while the latent cache keeps one small vector "
         "per position so long chats fit 你好 世界 谢谢 🙂 and numbers 0 1 2 3 4 5 6 7 8 9").split()


def chats(n: int, seq: int, seed: int = 0) -> list[dict]:
    r = random.Random(seed)

    def text(k):
        return " ".join(r.choice(WORDS) for _ in range(max(1, k)))
    out = []
    for _ in range(n):
        words = min(int(r.lognormvariate(4.0, 0.9)), seq // 2)      # median ~55 words, long tail
        turns = r.randint(1, 3)
        msgs = []
        for _ in range(turns):
            msgs += [{"role": "user", "content": text(words // (2 * turns))},
                     {"role": "assistant", "content": text(words // (2 * turns) + 1)}]
        out.append({"messages": msgs})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--chats", type=int, default=600)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--rows", type=int, default=8, help="rows per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto")
    args = p.parse_args(argv)
    from dsv2.bench.common import cpu_name
    print(f"CPU: {cpu_name()}", flush=True)

    import torch

    from dsv2.align.sft import SFTTrainer, load_sft_config
    from dsv2.bench.common import random_checkpoint
    tmp = Path(tempfile.mkdtemp(prefix="dsv2_sft_bench_"))
    random_checkpoint(tmp / "ckpt", args.preset, tokenizer=True)
    (tmp / "train.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n"
                                             for c in chats(args.chats, args.seq)))
    trainers, fed, real, times = {}, {}, {}, {}
    for mode in ("packed", "padded"):
        cfg = load_sft_config("deepseek-v2", [
            f"init_from={tmp / 'ckpt'}", f"data.train={tmp / 'train.jsonl'}", f"out_dir={tmp / mode}",
            f"data.seq_len={args.seq}", f"data.packing={mode == 'packed'}", "epochs=0", f"steps={args.steps + 1}",
            f"batch.micro_batch={args.micro_batch}", f"batch.start={args.rows}", f"batch.final={args.rows}",
            f"device={args.device}", f"precision={args.precision}", "optim.warmup_steps=1", "optim.lr=1e-5"])
        tr = SFTTrainer(cfg)
        read = tr.next_micro_batch

        def counted(n, read=read, mode=mode):
            batch, ids = read(n)
            fed[mode] += batch.input_ids.numel()
            return batch, ids
        tr.next_micro_batch = counted
        fed[mode], real[mode], times[mode] = 0, 0, []
        tr.train_step(0)                                   # warm-up, not counted
        fed[mode] = 0
        trainers[mode] = tr
    for step in range(1, args.steps + 1):
        for mode, tr in trainers.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = tr.train_step(step)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t0)
            real[mode] += out["tokens"]
    print(f"{args.preset}, {args.chats} chats, rows of {args.seq}, {args.rows} rows per step, "
          f"{args.steps} timed steps, {trainers['packed'].precision}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.device}")
    rate = {}
    for mode in trainers:
        rate[mode] = real[mode] / sum(times[mode])
        print(f"  {mode:7s} {rate[mode]:9,.0f} real tokens/s   padding {100 * (1 - real[mode] / fed[mode]):5.1f}% "
              f"of {fed[mode]:,} tokens fed   median step {statistics.median(times[mode]):.2f}s")
    print(f"  packed / padded: {rate['packed'] / rate['padded']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
