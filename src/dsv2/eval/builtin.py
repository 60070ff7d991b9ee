"""Generators of the built-in tasks' documents (eval/tasks/*.yaml): offline, seeded, in seconds.

    arithmetic   "Question: What is 47 plus 18?\\nAnswer:" -> " 65"         generate_until, chance ~0
    copy         "Copy: q w e r\\nOutput:" -> " q w e r"                      generate_until, chance ~0
    reverse      "Reverse: q w e r\\nOutput:" -> " r e w q"                   generate_until, chance ~0
    python_mc    8 lines of a stdlib module; which line comes next (1 of 4)  multiple_choice, chance 0.25
    passkey      a 5-digit key hidden in filler text of `length` tokens       generate_until, chance ~1e-5
    python_bpb   whole stdlib modules, scored token by token                  loglikelihood_rolling

Every split is drawn from its own stream (seed, split name), so a split's documents do not
change when another split's size does. python_mc and python_bpb read this interpreter's
standard library (the demo's corpus), so their documents follow the Python version;
the output records it.
"""

from __future__ import annotations

import random

WORDS = "apple river stone cloud maple tiger piano silver candle forest window garden rocket pencil".split()
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def generate(name: str, splits: dict, seed: int, args: dict, tokenizer=None) -> dict[str, list[dict]]:
    if name not in GENERATORS:
        raise ValueError(f"unknown generator {name!r}: one of {', '.join(sorted(GENERATORS))}.")
    fn = GENERATORS[name]
    try:
        return {split: fn(random.Random(f"{seed}:{split}"), int(n), tokenizer=tokenizer, **args)
                for split, n in splits.items()}
    except TypeError as e:
        raise ValueError(f"generator {name!r} was given arguments it does not take ({e}).") from None


def arithmetic(rng, n, digits: int = 2, ops: str = "+-", **_):
    docs = []
    names = {"+": "plus", "-": "minus", "*": "times"}
    for _ in range(n):
        a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
        op = rng.choice(ops)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        docs.append({"a": a, "b": b, "op": names[op], "answer": str(value)})
    return docs


def _letters(rng, n, length: int, reverse: bool):
    docs = []
    for _ in range(n):
        seq = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)]
        docs.append({"input": " ".join(seq), "answer": " ".join(seq[::-1] if reverse else seq)})
    return docs


def copy(rng, n, length: int = 5, **_):
    return _letters(rng, n, length, reverse=False)


def reverse(rng, n, length: int = 5, **_):
    return _letters(rng, n, length, reverse=True)


def _stdlib_lines() -> list[tuple[str, list[str]]]:
    from ..data.corpus import default_corpus
    out = []
    for p in default_corpus():
        try:
            out.append((p.name, p.read_text(encoding="utf-8").splitlines()))
        except (OSError, UnicodeDecodeError):
            continue
    return out


def python_mc(rng, n, context_lines: int = 8, **_):
    files = _stdlib_lines()
    rng.shuffle(files)
    docs = []
    for name, lines in files:
        if len(docs) == n:
            break
        good = [i for i in range(context_lines, len(lines)) if len(lines[i].strip()) >= 16]
        if not good:
            continue
        i = rng.choice(good)
        answer = lines[i]
        distract = set()
        while len(distract) < 3:   # real lines of other files, so style gives nothing away
            other = rng.choice(files)[1]
            cand = other[rng.randrange(len(other))] if other else ""
            if len(cand.strip()) >= 16 and cand != answer:
                distract.add(cand)
        choices = [answer, *sorted(distract)]
        rng.shuffle(choices)
        docs.append({"file": name, "context": "\n".join(lines[i - context_lines: i]), "choices": choices,
                     "label": choices.index(answer)})
    return docs


def python_bpb(rng, n, max_chars: int = 4000, **_):
    files = [(name, "\n".join(lines)) for name, lines in _stdlib_lines() if 500 < sum(map(len, lines)) ]
    rng.shuffle(files)
    return [{"file": name, "text": text[:max_chars]} for name, text in files[:n]]


def passkey(rng, n, length: int = 512, depth: float | None = None, tokenizer=None, **_):
    """Filler text of about `length` tokens with 'The pass key is NNNNN. Remember it.' at a
    relative depth (drawn per document unless given), then the question."""
    per = len(tokenizer.encode(FILLER, add_bos=False)) if tokenizer is not None else len(FILLER) // 4
    docs = []
    for _ in range(n):
        key = str(rng.randrange(10000, 100000))
        repeats = max(1, (length - 40) // per)
        where = rng.random() if depth is None else depth
        cut = int(round(where * repeats))
        text = (FILLER * cut + f"The pass key is {key}. Remember it. {key} is the pass key. "
                + FILLER * (repeats - cut))
        docs.append({"text": text, "answer": key, "depth": round(where, 3)})
    return docs


GENERATORS = {f.__name__: f for f in (arithmetic, copy, reverse, python_mc, python_bpb, passkey)}
