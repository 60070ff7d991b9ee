"""Chat data for fine-tuning: JSONL conversations -> token ids with assistant-only labels.

A line of the JSONL is one example, in either shape:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}           # = one user turn and one assistant turn

The tokenizer's chat template renders the conversation (tokenizer_config.json's
`chat_template`, else DeepSeek-V2's: BOS, system text + "\\n\\n", "User: ...\\n\\n",
"Assistant: ..." + EOS, and "Assistant:" as the generation prompt).

What is supervised, and where the token boundaries fall, comes from rendering the
conversation turn by turn rather than from searching the rendered text. For the i-th
assistant turn:

    P_i = render(messages before it, add_generation_prompt=True)   # what generation is given
    F_i = render(messages through it)                              # P_i + the answer

The answer is F_i[len(P_i):] (DeepSeek-V2: " " + content + EOS), and the text between
answers is P_i[len(F_{i-1}):]. Each piece is tokenised on its own and the ids are
concatenated, so the ids before an answer are the ids of its generation prompt, whatever a
BPE merge across the prompt/answer boundary would have done to the text as a whole (a
model that learned " Hello" after "Assistant:" must see exactly those "Assistant:" ids
when it generates). For later turns, the ids before answer i are the first prompt's ids,
then each earlier answer as the model produced it, then the new turn's text: what
`dsv2 chat` feeds the model (engine/chat.py keeps the ids it has seen). Labels are the
input ids on every answer token (EOS included, so the model learns to stop) and
IGNORE_INDEX (-100) everywhere else, unshifted; packing shifts them inside each example.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..model.loss import IGNORE_INDEX
from ..tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


class TemplateError(ValueError):
    pass


def check_messages(messages) -> str | None:
    """What is wrong with a conversation, in a few words, or None when it can be trained on."""
    if not isinstance(messages, list) or not messages:
        return "the conversation is empty" if messages == [] else "'messages' is not a list"
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"message {k} needs a 'role' and a 'content'"
        if m["role"] not in ROLES:
            return f"message {k} has the unknown role {m['role']!r} (use system, user or assistant)"
        if not isinstance(m["content"], str):
            return f"message {k}'s content is {type(m['content']).__name__}, not a string"
    if not any(m["role"] == "assistant" for m in messages):
        return "there is no assistant turn to learn from"
    return None


def as_messages(row) -> tuple[list | None, str | None]:
    """A JSONL row in either accepted shape -> (messages, None) or (None, what is wrong)."""
    if not isinstance(row, dict):
        return None, f"a line must hold a JSON object, got {type(row).__name__}"
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        return None, "a line needs 'messages', or 'prompt' and 'completion'"
    problem = check_messages(messages)
    return (None, problem) if problem else (messages, None)


@dataclass
class Conversations:
    """The good conversations of a JSONL file, and the bad lines (1-based) with their reasons."""
    messages: list[list[dict]]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def report(self, path) -> None:
        report_skipped(path, self.skipped)


def report_skipped(path, skipped: list[tuple[int, str]], file=sys.stderr, show: int = 5) -> None:
    """Say which lines of a JSONL file were skipped and why (the first `show` of them)."""
    if not skipped:
        return
    print(f"{path}: skipped {len(skipped)} bad line(s):", file=file)
    for line, why in skipped[:show]:
        print(f"  line {line}: {why}", file=file)
    if len(skipped) > show:
        print(f"  ... and {len(skipped) - show} more", file=file)


def read_jsonl(path: str | Path, parse, kind: str, example: str) -> tuple[list, list[tuple[int, str]]]:
    """Every line of a JSONL file through `parse(row) -> (item, None) | (None, what is wrong)`;
    -> (items, [(line number, what is wrong)]). Bad lines are listed, never silently lost; a
    file with no good line is refused with the first reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}: give a JSONL file with one {example} per line.")
    items, bad = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                bad.append((n, f"not JSON ({e.msg} at column {e.colno})"))
                continue
            item, problem = parse(row)
            if problem:
                bad.append((n, problem))
            else:
                items.append(item)
    if not items:
        why = f"; line {bad[0][0]}: {bad[0][1]}" if bad else ""
        raise ValueError(f"{path} holds no usable {kind}{why}.")
    return items, bad


def read_conversations(path: str | Path) -> Conversations:
    """Every line of a JSONL file as a conversation; a bad line is listed, never silently lost."""
    messages, bad = read_jsonl(path, as_messages, "conversation",
                               '{"messages": [...]} or {"prompt": ..., "completion": ...}')
    return Conversations(messages, bad)


def segments(tokenizer: Tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_answer) pieces, through its last assistant turn."""
    out, seen = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(seen) or not full.startswith(prompt):
            raise TemplateError("the chat template does not render a conversation as its earlier turns followed "
                                f"by the new one (assistant turn {i}): answers cannot be told apart from prompts.")
        out += [(prompt[len(seen):], False), (full[len(prompt):], True)]
        seen = full
    return out


def tokenize_conversation(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """-> (input_ids, labels): labels are the ids of every assistant answer (EOS included),
    IGNORE_INDEX elsewhere, unshifted. Turns after the last assistant answer are left out."""
    problem = check_messages(messages)
    if problem:
        raise ValueError(f"cannot tokenize this conversation: {problem}.")
    ids: list[int] = []
    labels: list[int] = []
    for k, (text, answer) in enumerate(segments(tokenizer, messages)):
        piece = tokenizer.encode_chat(text) if k == 0 else tokenizer.encode(text, add_bos=False)
        ids += piece
        labels += piece if answer else [IGNORE_INDEX] * len(piece)
    return ids, labels


def generation_prompt_ids(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """The ids generation starts from after `messages` (the conversation so far): for a first
    turn, the rendered generation prompt's ids, as `dsv2 serve` and `dsv2 chat` encode it."""
    return tokenizer.encode_chat(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def shifted(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) -> (input_ids, targets): targets[j] = labels[j + 1], and nothing after the last."""
    return ids, labels[1:] + [IGNORE_INDEX]
