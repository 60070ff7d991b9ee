"""Rewards for GRPO: named callables, the built-in verifiable ones, and their weighted sum.

A reward function is called once per batch of rollouts as

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

where `columns` are the dataset's other fields (e.g. `answer`), one value per completion.
None means "no opinion" and counts as 0. A config names functions as "module:function"
(any importable module), "rm:PATH" (a reward model, align/reward_model.py) or by a built-in
name, with a weight each; their weighted sum is
the reward r_i (paper eq. 36: c1 RM_helpful + c2 RM_safety + c3 RM_rule).

Built-ins:
    exact_match   1 if the final answer extracted from the completion equals the `answer` column
                  (GSM8K's "#### x", else "answer is x", else the last number, else the whole text)
    regex         1 if the completion matches the `pattern` column (re.search)
    code_tests    1 if the completion, run with the `tests` column (Python asserts) in a separate
                  process with a timeout and a memory limit, exits 0; never in the trainer's process
"""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

ANSWER_PATTERNS = (r"####\s*(.+?)\s*$", r"answer is\s*:?\s*(.+?)\s*\.?$")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class RewardError(ValueError):
    pass


def final_answer(text: str) -> str:
    """The final answer of a completion: after '####', else after 'answer is', else the last number."""
    text = text.strip()
    for pattern in ANSWER_PATTERNS:
        m = re.search(pattern, text, flags=re.IGNORECASE | re.MULTILINE)
        if m:
            return m.group(1).strip()
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else text


def exact_match(prompts, completions, answer=None, **_) -> list[float]:
    if answer is None:
        raise RewardError("exact_match needs an 'answer' column in the prompts file.")
    return [float(final_answer(c) == str(a).strip()) for c, a in zip(completions, answer)]


def regex(prompts, completions, pattern=None, **_) -> list[float]:
    if pattern is None:
        raise RewardError("regex needs a 'pattern' column in the prompts file.")
    return [float(re.search(p, c) is not None) for c, p in zip(completions, pattern)]


def code_tests(prompts, completions, tests=None, timeout_s: float = 5.0, memory_mb: int = 512, **_) -> list[float]:
    """Each completion's code followed by its tests, run by a fresh Python with limits."""
    if tests is None:
        raise RewardError("code_tests needs a 'tests' column (Python asserts) in the prompts file.")
    return [float(run_python(_code_block(c) + "\n\n" + t, timeout_s, memory_mb)) for c, t in zip(completions, tests)]


def _code_block(text: str) -> str:
    m = re.search(r"```(?:python)?\n(.*?)```", text, flags=re.DOTALL)
    return m.group(1) if m else text


def run_python(source: str, timeout_s: float = 5.0, memory_mb: int = 512) -> bool:
    """True if `source` runs to a clean exit in a separate, isolated interpreter within the limits."""
    def limit():                         # in the child, before exec: cap its address space and CPU
        import resource
        cap = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout_s) + 1, int(timeout_s) + 1))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "candidate.py")
        with open(path, "w") as f:
            f.write(source)
        try:
            r = subprocess.run([sys.executable, "-I", path], cwd=d, timeout=timeout_s, capture_output=True,
                               preexec_fn=limit if os.name == "posix" else None, env={"PATH": os.environ.get("PATH", "")})
        except subprocess.TimeoutExpired:
            return False
    return r.returncode == 0


BUILTIN: dict[str, Callable] = {"exact_match": exact_match, "regex": regex, "code_tests": code_tests}


def resolve(name: str) -> Callable:
    """A built-in name, "rm:PATH" (a reward model from `dsv2 rm train`) or "module:function"."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name.startswith("rm:"):
        from .reward_model import ModelReward
        return ModelReward(name[3:])
    if ":" not in name:
        raise RewardError(f"unknown reward {name!r}: use a built-in ({', '.join(BUILTIN)}) or 'module:function'.")
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"reward {name!r} cannot be imported ({e}).") from None
    if not callable(fn):
        raise RewardError(f"reward {name!r} is not a function.")
    return fn


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0


class Rewards:
    """Several reward functions with weights; `__call__` -> (total [B], {name: [B] per function})."""

    def __init__(self, spec: dict[str, float] | list[str], extra: dict[str, Callable] | None = None):
        items = spec.items() if isinstance(spec, dict) else [(n, 1.0) for n in spec]
        if not items:
            raise RewardError("GRPO needs at least one reward: set rewards: {exact_match: 1.0} or similar.")
        self.rewards = [Reward(n, (extra or {}).get(n) or resolve(n), float(w)) for n, w in items]

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> tuple[list[float], dict]:
        per: dict[str, list[float]] = {}
        for r in self.rewards:
            try:
                out = r.fn(prompts, completions, **columns)
            except RewardError:
                raise
            except Exception as e:  # noqa: BLE001 - a user's reward failing is reported by name
                raise RewardError(f"reward {r.name!r} raised {type(e).__name__}: {e}") from e
            out = list(out) if out is not None else None
            if out is None or len(out) != len(completions):
                raise RewardError(f"reward {r.name!r} returned {'nothing' if out is None else len(out)} values "
                                  f"for {len(completions)} completions; return one float (or None) per completion.")
            vals = [0.0 if v is None else float(v) for v in out]
            if any(not math.isfinite(v) for v in vals):
                raise RewardError(f"reward {r.name!r} returned a non-finite value ({next(v for v in vals if not math.isfinite(v))}); "
                                  "rewards must be finite floats or None.")
            per[r.name] = vals
        total = [sum(r.weight * per[r.name][i] for r in self.rewards) for i in range(len(completions))]
        return total, per
