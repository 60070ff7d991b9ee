"""Run tasks (eval/tasks.py) on a model through the engine: `dsv2 eval tasks`.

    dsv2 eval tasks runs/demo/pretrain/hf --tasks python_mc arithmetic --limit 100 --out runs/eval
    dsv2 eval tasks MODEL --tasks my_task.yaml --shots 5

- multiple_choice: every choice is scored by log P(target_delimiter + choice | context); the
  choices of one question share the context, which the Scorer (engine/score.py) computes
  once. acc takes the highest log-likelihood; acc_norm divides it by the choice's length in
  characters (lm-evaluation-harness's definition).
- generate_until: greedy decoding through the slot engine (dsv2.LLM), cut at the first `until`
  string; exact_match compares the filter's extraction with the target.
- loglikelihood_rolling: the document's summed nll through sliding windows of the model's
  whole context (eval/perplexity.py) -> bits_per_byte, byte_perplexity, word_perplexity.

Each metric comes with its standard error (sample std / sqrt(n)). With --out, results.json
holds the metrics and the configuration, and samples_<task>.jsonl every document's prompt,
answers and scores.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path

from .tasks import Task


def load_model(path, dtype=None, quantize: str | None = None):
    """A checkpoint directory -> (model in eval mode, its tokenizer); both are required.
    quantize: "int8" or "fp8" weights (dsv2.quant)."""
    from ..checkpoint import load_pretrained
    from ..tokenizer import load_tokenizer
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}: give a folder with config.json and weights.")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}: evaluation needs the model's tokenizer next to it.")
    model = load_pretrained(path, dtype=dtype, quantize=quantize)
    return model, load_tokenizer(path, model.config.vocab_size)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as one text encodes them (a word split across the
    boundary is tokenized as in the whole); the context's trailing spaces move to the
    continuation, as lm-evaluation-harness does."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _stderr(xs: list[float]) -> float:
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def run_task(task: Task, model, tokenizer, shots: int | None = None, limit: int | None = None,
             scorer=None, llm=None, progress: bool = True, kv_cache_dtype: str | None = None) -> tuple[dict, list[dict]]:
    """-> (metrics, per-document records). kv_cache_dtype: the latent cache's format for every
    kind of task (engine/cache.py)."""
    from tqdm import tqdm
    k = task.num_fewshot if shots is None else shots
    docs = task.docs[task.test_split][:limit]
    if not docs:
        raise ValueError(f"task {task.task} has no documents to score.")
    t0 = time.perf_counter()
    if task.output_type == "multiple_choice":
        from ..engine.score import Scorer
        scorer = scorer or Scorer(model, kv_cache_dtype=kv_cache_dtype)
        pairs, meta = [], []
        for i, doc in enumerate(docs):
            ctx, choices = task.context(i, k), task.choices(doc)
            pairs += [encode_pair(tokenizer, ctx, task.target_delimiter + c) for c in choices]
            meta.append((ctx, choices))
        with tqdm(total=len(pairs), desc=task.task, unit="choice", disable=not progress) as bar:
            scored = iter(scorer.loglikelihood(pairs, bar))   # a question's choices share one context
        records = []
        for i, (doc, (ctx, choices)) in enumerate(zip(docs, meta)):
            lls = [next(scored)[0] for _ in choices]
            gold = task.gold(doc)
            norm = [ll / max(1, len(c)) for ll, c in zip(lls, choices)]
            acc = float(max(range(len(lls)), key=lls.__getitem__) == gold)
            acc_norm = float(max(range(len(norm)), key=norm.__getitem__) == gold)
            records.append({"doc_id": i, "context": ctx, "choices": choices, "gold": gold, "loglikelihoods": lls,
                            "acc": acc, "acc_norm": acc_norm})
        names = ("acc", "acc_norm")
    elif task.output_type == "generate_until":
        from ..engine import LLM
        llm = llm or LLM(model, tokenizer=tokenizer, kv_cache_dtype=kv_cache_dtype)
        gk = {"until": [], "max_gen_toks": 256} | task.generation_kwargs
        prompts = [task.context(i, k) for i in range(len(docs))]
        outs = llm.generate(prompts, max_new_tokens=int(gk["max_gen_toks"]), temperature=0.0,
                            stop=list(gk["until"]) or None)
        records = []
        for i, (doc, prompt, out) in enumerate(zip(docs, prompts, outs)):
            target, got = task.target(doc).strip(), task.extract(out.text)
            records.append({"doc_id": i, "prompt": prompt, "response": out.text, "extracted": got, "target": target,
                            "exact_match": float(got == target)})
        names = ("exact_match",)
    else:
        from .perplexity import default_window, score_windows
        L = default_window(model)
        records = []
        for i, doc in enumerate(tqdm(docs, desc=task.task, unit="doc", disable=not progress)):
            text = task.text(doc)
            ids = tokenizer.encode(text)
            if not tokenizer.add_bos or tokenizer.bos_id is None:
                ids = [tokenizer.eos_id if tokenizer.eos_id is not None else 0] + ids   # score every token
            nll, n = score_windows(model, ids, L, L, kv_cache_dtype=kv_cache_dtype)
            records.append({"doc_id": i, "nll": nll, "tokens": n, "bytes": len(text.encode()),
                            "words": len(text.split())})
        nll = sum(r["nll"] for r in records)
        metrics = {"bits_per_byte": nll / (math.log(2) * sum(r["bytes"] for r in records)),
                   "byte_perplexity": math.exp(nll / sum(r["bytes"] for r in records)),
                   "word_perplexity": math.exp(nll / max(1, sum(r["words"] for r in records))),
                   "n": len(records), "seconds": time.perf_counter() - t0}
        return metrics, records
    metrics = {}
    for name in names:
        xs = [r[name] for r in records]
        metrics[name], metrics[f"{name}_stderr"] = statistics.fmean(xs), _stderr(xs)
    metrics.update(n=len(records), shots=k, chance=task.chance, seconds=time.perf_counter() - t0)
    return metrics, records


def table(results: dict[str, dict]) -> str:
    rows = [("task", "metric", "value", "± stderr", "chance", "n")]
    for name, m in results.items():
        for metric in ("acc", "acc_norm", "exact_match", "bits_per_byte", "byte_perplexity", "word_perplexity"):
            if metric in m:
                err = m.get(f"{metric}_stderr")
                rows.append((name, metric, f"{m[metric]:.4f}", "" if err is None or math.isnan(err) else f"{err:.4f}",
                             "" if m.get("chance") is None else f"{m['chance']:.2f}", str(m["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def write_results(out: Path, results: dict, samples: dict, config: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name, records in samples.items():
        with open(out / f"samples_{name}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"results": results, "config": config | {"python": platform.python_version()}},
                              indent=2, ensure_ascii=False, default=str))
    tmp.replace(path)
    return path
