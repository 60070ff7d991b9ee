"""Multiple-choice scoring speed: `dsv2 eval tasks` beside lm-evaluation-harness's HF model.

    .venv/bin/python bench/eval_tasks.py                      # small preset, 40 python_mc questions
    .venv/bin/python bench/eval_tasks.py --questions 100 --hf-batch 8 --context-lines 32

Random `small` weights with a byte-level BPE tokenizer are written once in Hugging Face format.
The task is the built-in python_mc (8 lines of a stdlib module, which of 4 lines comes next),
zero-shot. Measured, in the same process, one after the other, after a warm-up on 4 questions:
- dsv2: `run_task` (what `dsv2 eval tasks` runs): each question's context and its 4 choices
  run as one sequence under a tree mask, the context computed once (engine/score.py);
- lm-eval HFLM (transformers' DeepseekV2ForCausalLM): `HFLM.loglikelihood` on exactly the same
  4 (context, continuation) requests per question, at its batch size (--hf-batch);
- dsv2's harness model `DSV2LM.loglikelihood` on those requests, for the adapter's own speed.
Both score every choice; the log-likelihoods are compared (max difference printed: DSV2LM's
requests are HFLM's exactly; `dsv2 eval tasks` puts BOS first as the tokenizer config says,
which HFLM does not, so its figures differ by that token's context).
The gain comes mostly from the work saved: 4 x (context + choice) tokens against context + 4 x
choice, about 2.8x for 8 lines of context and whole-line choices, more for longer contexts; the
rest from taking the head and the last layer's FFN only where logits are read (HFLM's forward
computes them at every token).
Figures: questions per second, and the ratio to HFLM.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--context-lines", type=int, default=8, help="python_mc's lines of context (default 8)")
    p.add_argument("--hf-batch", type=int, default=8, help="HFLM batch size (default 8)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    import dsv2
    from dsv2.bench.common import cpu_name, random_checkpoint
    from dsv2.engine.score import Scorer
    from dsv2.eval.harness import DSV2LM
    from dsv2.eval.runner import run_task
    from dsv2.eval.tasks import load_task
    print(f"CPU: {cpu_name()}", flush=True)
    from dsv2.tokenizer import Tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{args.preset}-random"
        random_checkpoint(ckpt, args.preset, tokenizer=True)
        model, tok = dsv2.load_pretrained(ckpt, dtype=torch.float32), Tokenizer(ckpt)
        task = load_task(f"python_mc:dataset.splits.test={args.questions + 4},"
                         f"dataset.args.context_lines={args.context_lines}", tok)
        warm, docs = task.docs["test"][:4], task.docs["test"][4:]
        requests = [SimpleNamespace(args=(task.context(i + 4, 0), task.target_delimiter + c))
                    for i, d in enumerate(docs) for c in task.choices(d)]
        warm_reqs = [SimpleNamespace(args=(task.context(i, 0), c)) for i, d in enumerate(warm) for c in task.choices(d)]
        n_tokens = sum(len(tok.encode(r.args[0] + r.args[1])) for r in requests)
        n_ctx = sum(len(tok.encode(task.context(i + 4, 0))) for i in range(len(docs))) / len(docs)
        print(f"{args.preset}: {model.num_params() / 1e6:.1f}M parameters; {len(docs)} questions x 4 choices, "
              f"{args.context_lines} lines of context: {n_ctx:.0f} context tokens, "
              f"{n_tokens / len(requests) - n_ctx:.0f} per choice; {args.threads} threads")

        scorer = Scorer(model)
        task.docs["test"] = warm
        run_task(task, model, tok, 0, scorer=scorer, progress=False)
        task.docs["test"] = docs
        t = time.perf_counter()
        metrics, records = run_task(task, model, tok, 0, scorer=scorer, progress=False)
        ours = time.perf_counter() - t

        adapter = DSV2LM(pretrained=str(ckpt), dtype="float32", batch_size=16)
        adapter.loglikelihood(warm_reqs, disable_tqdm=True)
        t = time.perf_counter()
        via_adapter = adapter.loglikelihood(requests, disable_tqdm=True)
        ad = time.perf_counter() - t

        hf = HFLM(pretrained=str(ckpt), dtype="float32", batch_size=args.hf_batch, device="cpu")
        hf.loglikelihood(warm_reqs, disable_tqdm=True)
        t = time.perf_counter()
        theirs = hf.loglikelihood(requests, disable_tqdm=True)
        ref = time.perf_counter() - t
    ours_ll = [ll for r in records for ll in r["loglikelihoods"]]
    diff = max(abs(a - b[0]) for a, b in zip(ours_ll, theirs))
    diff_ad = max(abs(a[0] - b[0]) for a, b in zip(via_adapter, theirs))
    q = len(docs)
    print("| engine | questions/s | vs HFLM |\n|---|---|---|")
    print(f"| lm-eval HFLM (transformers, batch {args.hf_batch}) | {q / ref:.2f} | 1.00x |")
    print(f"| dsv2 eval tasks | {q / ours:.2f} | **{ref / ours:.2f}x** |")
    print(f"| dsv2 harness model (DSV2LM) | {q / ad:.2f} | {ref / ad:.2f}x |")
    print(f"max |loglikelihood difference| vs HFLM: {diff:.2e} (dsv2 eval tasks), {diff_ad:.2e} (DSV2LM); "
          f"acc {metrics['acc']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
