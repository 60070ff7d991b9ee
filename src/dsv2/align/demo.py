"""`dsv2 demo --stage sft` / `make demo-sft`: fine-tune the demo model to follow instructions.

    dsv2 demo --stage sft                     # uses runs/demo/pretrain/hf (`make demo`), else pretrains one first
    dsv2 demo --stage sft --seed 1 epochs=2   # another seed; any `dsv2 sft` override after the options

1. write the generated instruction set (align/instructions.py) as train / held-out JSONL;
2. the base model's greedy answers to a few held-out prompts, and its held-out exact match;
3. `dsv2 sft` with presets/sft/demo.yaml (assistant-only loss, packed rows);
4. the same prompts and the held-out exact match after, with the share of answers that
   ended at EOS (the model learned to stop) and the exact match per kind.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

SHOW = 6   # held-out prompts printed before and after


def exact_match(hf_dir, chats: list[dict], max_new_tokens: int = 24) -> dict:
    """Greedy answers to each chat's user turn, scored by exact match (whitespace-stripped)."""
    from ..engine import LLM
    from .conversations import generation_prompt_ids
    llm = LLM(str(hf_dir), dtype="float32")
    prompts = [generation_prompt_ids(llm.tokenizer, c["messages"][:-1]) for c in chats]
    outs = llm.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    answers = [o.text.strip() for o in outs]
    hits = [a == c["answer"] for a, c in zip(answers, chats)]
    by_kind = defaultdict(list)
    for h, c in zip(hits, chats):
        by_kind[c["kind"]].append(h)
    return {"exact_match": sum(hits) / len(hits), "stopped": sum(o.finish_reason == "stop" for o in outs) / len(outs),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}, "answers": answers}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def run_sft_demo(out: Path, base: Path, seed: int = 0, overrides: list[str] | None = None,
                 n_train: int = 6000, n_held_out: int = 250) -> dict:
    from .instructions import instruction_set
    from .sft import SFTTrainer, load_sft_config
    data = out / "sft" / "data"
    train, held = instruction_set(n_train, n_held_out, seed=0)   # the same data for every seed
    write_jsonl(data / "train.jsonl", train)
    write_jsonl(data / "val.jsonl", held)
    print(f"[sft 1/4] instruction set: {len(train)} train, {len(held)} held-out chats "
          f"(arithmetic, upper-case, reverse, greetings, capitals) in {data}")
    before = exact_match(base, held)
    print(f"[sft 2/4] base model {base}: held-out exact match {100 * before['exact_match']:.1f}%")
    cfg = load_sft_config("demo", [f"init_from={base}", f"data.train={data / 'train.jsonl'}",
                                   f"data.val={data / 'val.jsonl'}", f"out_dir={out / 'sft'}", f"seed={seed}",
                                   *(overrides or [])])
    print(f"[sft 3/4] fine-tuning (presets/sft/demo.yaml, seed {seed}; metrics: {out / 'sft' / 'metrics.jsonl'})")
    result = SFTTrainer(cfg).fit()
    after = exact_match(result["export"], held)
    print("[sft 4/4] held-out prompts, greedy, before -> after SFT:")
    for c, a, b in list(zip(held, before["answers"], after["answers"]))[:SHOW]:
        print(f"  {c['messages'][0]['content']}\n    before: {a[:60]!r}\n    after:  {b!r}   (expected {c['answer']!r})")
    print(f"held-out exact match: {100 * before['exact_match']:.1f}% before, {100 * after['exact_match']:.1f}% "
          f"after SFT; answers ending at EOS: {100 * before['stopped']:.0f}% -> {100 * after['stopped']:.0f}%; "
          "after, by kind: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in after["by_kind"].items()))
    print(f"try: dsv2 chat {result['export']}")
    return {"before": before, "after": after, "val_loss": result["val_loss"], "val_loss_before": result.get("unigram_val_loss"),
            "export": result["export"]}
