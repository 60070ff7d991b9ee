"""Needle in a haystack and passkey retrieval over a grid of lengths and depths (`dsv2 eval niah`).

    dsv2 eval niah MODEL --lengths 1k,2k,4k --depths 0,10,...,100 --trials 2 --out runs/niah
    dsv2 eval niah MODEL --lengths 512,1024 --passkey --out runs/passkey      # the YaRN paper's test

NIAH (Kamradt's test, the paper's Fig. 4): the haystack is the sentences of eval/haystack.txt,
which ships with dsv2, cycled to the length asked. The needle "The secret code is NNNNNNN." goes
in at the sentence boundary closest to `depth` percent of the haystack's tokens (0: before the
first sentence, 100: after the last). The prompt ends with the question, and the model's greedy
answer is correct when its first number is the key (7 digits unless --key-digits says otherwise).

--passkey is the cheaper test of the YaRN paper (after Mohtashami and Jaggi): an instruction,
"The grass is green. The sky is blue. ..." repeated, "The pass key is NNNNNNN. Remember it.
NNNNNNN is the pass key." at the depth, and "What is the pass key? The pass key is".

Each (length, depth, trial) draws its 7-digit key from its own seeded stream, so a record
depends only on --seed and its coordinates. A 7-digit key is several tokens for most
tokenizers; the answer is read as text. Prompts of one length run batched through the engine.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

HAYSTACK = Path(__file__).with_name("haystack.txt")
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again."]
MODES = {
    "niah": dict(intro="", needle="The secret code is {key}.",
                 question="\n\nWhat is the secret code mentioned in the text above? The secret code is"),
    "passkey": dict(intro=PASSKEY_INTRO, needle="The pass key is {key}. Remember it. {key} is the pass key.",
                    question="\n\nWhat is the pass key? The pass key is"),
}
ANSWER_TOKENS = 12   # room for the key's tokens after the prompt


@dataclass
class Prompt:
    length: int          # the prompt's token budget (the grid's length)
    depth: int           # percent of the haystack before the needle
    trial: int
    key: str
    ids: list[int]
    needle_at: int       # token index where the needle starts
    haystack: tuple[int, int]   # token span of the haystack (needle excluded: where depth is measured)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)


def parse_lengths(text: str) -> list[int]:
    """'1k,2k,4096' -> [1024, 2048, 4096] (k = 1024 tokens)."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(k?)", part)
        if not m or int(m.group(1)) < 1:
            raise ValueError(f"--lengths takes token counts like 512,1k,4k; {part!r} is not one.")
        out.append(int(m.group(1)) * (1024 if m.group(2) else 1))
    if not out:
        raise ValueError("--lengths is empty: give token counts like 1k,2k,4k.")
    return sorted(set(out))


def parse_depths(text: str) -> list[int]:
    """'0,25,50' or '0,10,...,100' (a step from the first two) -> percents in 0..100."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        if "..." in parts:
            i = parts.index("...")
            if i != 2 or len(parts) != 4:
                raise ValueError
            a, b, end = int(parts[0]), int(parts[1]), int(parts[3])
            if b <= a:
                raise ValueError
            depths = list(range(a, end + 1, b - a))
        else:
            depths = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--depths takes percents like 0,50,100 or 0,10,...,100; got {text!r}.") from None
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad or not depths:
        raise ValueError(f"--depths must lie in 0..100 (percent of the haystack before the needle); got {bad or text}.")
    return sorted(set(depths))


@functools.lru_cache(maxsize=None)
def _sentences(mode: str) -> tuple[str, ...]:
    if mode == "passkey":
        return tuple(PASSKEY_FILLER)
    text = HAYSTACK.read_text(encoding="utf-8")
    return tuple(s.strip() + "." for s in re.split(r"(?<=\.)\s+", text) if s.strip().strip("."))


def make_key(seed: int, mode: str, length: int, depth: int, trial: int, digits: int = 7) -> str:
    return str(random.Random(f"{seed}:{mode}:{length}:{depth}:{trial}").randrange(10**(digits - 1), 10**digits))


def build_prompt(tok, mode: str, length: int, depth: int, key: str, trial: int = 0) -> Prompt:
    """The token ids of one prompt: at most `length` of them, the needle at `depth` percent."""
    spec = MODES[mode]
    head = tok.encode(spec["intro"]) if spec["intro"] else tok.encode("")
    needle = tok.encode(" " + spec["needle"].format(key=key), add_bos=False)
    question = tok.encode(spec["question"], add_bos=False)
    budget = length - len(head) - len(needle) - len(question)
    pieces = [tok.encode(" " + s, add_bos=False) for s in _sentences(mode)]
    if budget < max(len(p) for p in pieces):
        raise ValueError(f"a length of {length} tokens leaves no room for a haystack around the needle and "
                         f"question ({length - budget} tokens): use at least {length - budget + 64}.")
    hay, n = [], 0
    while n + len(pieces[len(hay) % len(pieces)]) <= budget:
        hay.append(pieces[len(hay) % len(pieces)])
        n += len(hay[-1])
    # The boundary (0..len(hay)) whose token offset is closest to depth% of the haystack.
    offsets = [0]
    for p in hay:
        offsets.append(offsets[-1] + len(p))
    target = depth / 100 * n
    b = min(range(len(offsets)), key=lambda i: abs(offsets[i] - target))
    before = [t for p in hay[:b] for t in p]
    after = [t for p in hay[b:] for t in p]
    ids = head + before + needle + after + question
    start = len(head)
    return Prompt(length, depth, trial, key, ids, start + len(before), (start, start + n + len(needle)))


def is_correct(answer: str, key: str) -> bool:
    """The first number in the answer is the key (leading spaces, punctuation and the key's
    tokenisation do not matter)."""
    m = re.search(r"\d+", answer)
    return m is not None and m.group(0) == key


def run_niah(llm, lengths: list[int], depths: list[int], trials: int = 1, seed: int = 0,
             passkey: bool = False, batch: int = 8, progress: bool = True, key_digits: int = 7) -> dict:
    """Build, answer and score every (length, depth, trial) prompt -> the niah.json object."""
    mode = "passkey" if passkey else "niah"
    cfg, tok = llm.model.config, llm.tokenizer
    if tok is None:
        raise ValueError("the needle test needs the model's tokenizer (tokenizer.json beside the weights).")
    if trials < 1:
        raise ValueError(f"--trials must be 1 or more, got {trials}.")
    if not 1 <= key_digits <= 18:
        raise ValueError(f"--key-digits must be 1 to 18, got {key_digits}.")
    too_long = [n for n in lengths if n + ANSWER_TOKENS > cfg.max_position_embeddings]
    if too_long:
        raise ValueError(f"length {too_long[0]:,} (+{ANSWER_TOKENS} answer tokens) exceeds the model's context "
                         f"(max_position_embeddings = {cfg.max_position_embeddings:,}); extend it with YaRN or "
                         "ask for shorter lengths.")
    from tqdm import tqdm
    prompts = [build_prompt(tok, mode, n, d, make_key(seed, mode, n, d, t, key_digits), t)
               for n in lengths for d in depths for t in range(trials)]
    results = []
    bar = tqdm(total=len(prompts), desc=f"{mode}", unit="prompt", disable=not progress)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        outs = llm.generate([p.ids for p in chunk], max_new_tokens=ANSWER_TOKENS, temperature=0.0)
        for p, out in zip(chunk, outs):
            results.append({"length": p.length, "depth": p.depth, "trial": p.trial, "correct": is_correct(out.text, p.key),
                            "prompt_tokens": p.prompt_tokens, "key": p.key, "answer": out.text})
        bar.update(len(chunk))
    bar.close()
    acc = {f"{n}x{d}": sum(r["correct"] for r in results if r["length"] == n and r["depth"] == d) / trials
           for n in lengths for d in depths}
    return {"mode": mode, "seed": seed, "key_digits": key_digits, "lengths": lengths, "depths": depths, "trials": trials,
            "accuracy": sum(r["correct"] for r in results) / len(results), "cells": acc, "results": results}


def write_outputs(report: dict, out: Path, title: str) -> tuple[Path, Path]:
    """DIR/niah.json and DIR/niah.png (accuracy by length x depth, the paper's colour scale)."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "niah.json"
    js.write_text(json.dumps(report, indent=1) + "\n")
    return js, plot_heatmap(report, out / "niah.png", title)


def plot_heatmap(report: dict, path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap
    lengths, depths = report["lengths"], report["depths"]
    grid = [[report["cells"][f"{n}x{d}"] for n in lengths] for d in depths]
    cmap = LinearSegmentedColormap.from_list("niah", ["#F0496E", "#EBB839", "#0CD79F"])   # red -> yellow -> green
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(lengths), 1.2 + 0.45 * len(depths)))
    im = ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(f"{title}\n{report['mode']}: {report['accuracy']:.0%} correct "
                 f"({len(report['results'])} prompts, seed {report['seed']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
