"""The demo's instruction set: five kinds of generated chats, split into train and held-out.

    from dsv2.align.instructions import instruction_set
    train, held_out = instruction_set(seed=0)        # lists of {"messages": [...], "answer": ...}

Kinds (each answer is short, so exact match is a fair score):
    arithmetic   "Ann has 3 pears and gets 4 more. How many pears does Ann have now?" -> "7"
    upper        "Upper-case this: red fox runs" -> "RED FOX RUNS"
    reverse      "Reverse the order of these words: red fox runs" -> "runs fox red"
    greeting     "How do you say 'thank you' in Chinese?" -> "谢谢" (and back to English)
    capital      "What is the capital of France?" -> "Paris" (a fixed table, several phrasings)

Held-out prompts never occur in train. They test the skill, not new facts: a held-out
capital question uses a country seen in train under another phrasing, held-out sums use
digits seen in train with other names and things, held-out word lists are new orders
and combinations of words seen in train.
"""

from __future__ import annotations

import random

NAMES = ["Ann", "Bob", "Cai", "Dan", "Eva", "Li", "Mia", "Sam", "Tom", "Zoe"]
THINGS = ["apples", "pears", "books", "cats", "coins", "pens", "cups", "eggs"]
WORDS = ["red", "blue", "green", "fox", "dog", "cat", "runs", "sits", "big", "small", "tree", "house",
         "sun", "moon", "fast", "slow", "cold", "warm", "bird", "fish"]
GREETINGS = [("hello", "你好"), ("thank you", "谢谢"), ("good morning", "早上好"), ("good night", "晚安"),
             ("goodbye", "再见"), ("sorry", "对不起"), ("welcome", "欢迎"), ("friend", "朋友")]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Egypt", "Cairo"),
            ("China", "Beijing"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Cuba", "Havana"), ("Chile", "Santiago"), ("India", "New Delhi"), ("Canada", "Ottawa"),
            ("Russia", "Moscow"), ("Germany", "Berlin")]
CAPITAL_ASKS = ["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?",
                "{} has which city as its capital?"]


def _arithmetic(r: random.Random) -> tuple[str, str]:
    name, thing = r.choice(NAMES), r.choice(THINGS)
    a, b = r.randint(0, 9), r.randint(0, 9)
    if r.random() < 0.5:
        return f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", str(a + b)
    a, b = max(a, b), min(a, b)
    return f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have now?", str(a - b)


def _words(r: random.Random) -> list[str]:
    return r.sample(WORDS, r.randint(2, 4))


def _upper(r: random.Random) -> tuple[str, str]:
    w = _words(r)
    return f"Upper-case this: {' '.join(w)}", " ".join(w).upper()


def _reverse(r: random.Random) -> tuple[str, str]:
    w = _words(r)
    return f"Reverse the order of these words: {' '.join(w)}", " ".join(reversed(w))


def _greeting(r: random.Random) -> tuple[str, str]:
    en, zh = r.choice(GREETINGS)
    if r.random() < 0.5:
        return r.choice(["How do you say '{}' in Chinese?", "Translate to Chinese: {}"]).format(en), zh
    return r.choice(["What does '{}' mean in English?", "Translate to English: {}"]).format(zh), en


def _capital(r: random.Random) -> tuple[str, str]:
    country, city = r.choice(CAPITALS)
    return r.choice(CAPITAL_ASKS).format(country), city


KINDS = {"arithmetic": _arithmetic, "upper": _upper, "reverse": _reverse, "greeting": _greeting, "capital": _capital}


def instruction_set(n_train: int = 6000, n_held_out: int = 250, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held_out): chats {"messages": [user, assistant], "kind", "answer"}, kinds in turn.

    Held-out prompts are drawn first and train draws skip them. Greetings (32 prompts) are
    all in train; a capital is held out under one phrasing at most, so its country is in
    train under the others."""
    r = random.Random(seed)
    held: dict[str, tuple[str, str]] = {}
    countries: set[str] = set()
    kinds = [k for k in KINDS if k != "greeting"]
    for i in range(n_held_out * 20):
        if len(held) >= n_held_out:
            break
        kind = kinds[i % len(kinds)]
        prompt, answer = KINDS[kind](r)
        if kind == "capital":
            if answer in countries:
                continue
            countries.add(answer)
        held.setdefault(prompt, (kind, answer))
    train: list[dict] = []
    every = list(KINDS)
    while len(train) < n_train:
        kind = every[len(train) % len(every)]
        prompt, answer = KINDS[kind](r)
        if prompt not in held:
            train.append(_chat(kind, prompt, answer))
    return train, [_chat(kind, prompt, answer) for prompt, (kind, answer) in held.items()]


def _chat(kind: str, prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "kind": kind, "answer": answer}
