"""Multi-turn chat: history rendered by the chat template, the cached prefix reused across turns.

The conversation keeps one single-slot engine and the exact token ids the model has seen
(prompts and its own replies). Each turn renders the history with the tokenizer's chat
template (tokenizer_config.json) or DeepSeek-V2's `User: ...\\n\\nAssistant:` format, and
only the text the new turn adds is tokenised and appended to those ids: re-tokenising the
model's reply could split it differently and break the shared prefix. The engine then
prefills only the tokens after the prefix its slot already holds, so a turn costs its new
tokens, not the whole conversation again.

    dsv2 chat path/to/checkpoint          # /clear forgets the history, /exit (or Ctrl-D) leaves
"""

from __future__ import annotations

import sys
import time
from typing import Iterator

from .cache import common_prefix
from .engine import Engine, Request
from .sampling import SamplingParams


class ChatSession:
    def __init__(self, llm, system: str | None = None, max_len: int | None = None):
        if llm.tokenizer is None:
            raise ValueError("chat needs a tokenizer: put tokenizer.json next to the weights or pass tokenizer=.")
        self.llm = llm
        self.system = system
        ctx = llm.model.config.max_position_embeddings
        self.engine = Engine(llm.model, llm.tokenizer, max_batch_slots=1,
                             max_len=min(ctx, max_len or ctx, 4096), compile=llm.compile,
                             native=llm.native)
        self.messages: list[dict] = []
        self.ids: list[int] = []       # the conversation as the model saw it, through the last reply
        self.last_prefill_tokens = 0   # tokens the last turn actually prefilled (after reuse)
        self.last_stats = ""

    def clear(self) -> None:
        self.messages, self.ids = [], []

    def history(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def send(self, text: str, **sampling) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply (the reply joins the history)."""
        if not text.strip():
            raise ValueError("the message is empty.")
        tok = self.llm.tokenizer
        seen = tok.apply_chat_template(self.history(), add_generation_prompt=False) if self.ids else None
        self.messages.append({"role": "user", "content": text})
        rendered = tok.apply_chat_template(self.history(), add_generation_prompt=True)
        if seen is not None and rendered.startswith(seen):
            prompt = self.ids + tok.encode(rendered[len(seen):], add_bos=False)
        else:
            prompt = tok.encode_chat(rendered)
        params = SamplingParams.make(**sampling)
        req = Request(prompt, params)
        try:
            self.engine.validate(req)
        except ValueError:
            self.messages.pop()
            raise ValueError(f"the conversation ({len(prompt)} tokens) no longer fits in the "
                             f"{self.engine.max_len}-token context: /clear to start over.") from None
        cached = self.engine.cached_ids[0]
        t0 = time.perf_counter()
        self.engine.add(req)
        self.last_prefill_tokens = len(prompt) - common_prefix(cached, prompt, limit=len(prompt) - 1)
        reply, n, t1 = [], 0, time.perf_counter()
        generated, reason = [], None
        while self.engine.seqs:
            for out in self.engine.step():
                n += 1
                generated.append(out.token_id)
                reason = out.finish_reason or reason
                if out.text:
                    reply.append(out.text)
                    yield out.text
        dt = time.perf_counter() - t1
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        # A stop string cuts the reply text inside the sampled tokens: the ids would hold text the
        # history does not, so the next turn re-renders the whole conversation instead.
        cut = reason == "stop" and bool(generated) and generated[-1] not in (tok.eos_id, *params.stop_token_ids)
        if tok.eos_id is not None and (not generated or generated[-1] != tok.eos_id):
            generated.append(tok.eos_id)  # the template closes every assistant turn with EOS
        self.ids = [] if cut else prompt + generated
        self.last_stats = (f"[{self.last_prefill_tokens} prompt tokens prefilled in {t1 - t0:.2f}s, "
                           f"{n} tokens at {n / max(dt, 1e-9):.1f} tokens/s]")


def repl(session: ChatSession, sampling: dict, stdin=None, stdout=None, stderr=None) -> int:
    """Read-eval-print loop: one user turn per line; /clear, /exit."""
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/clear":
            session.clear()
            print("[history cleared]", file=stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line}: use /clear or /exit.", file=stderr)
            continue
        try:
            for chunk in session.send(line, **sampling):
                stdout.write(chunk)
                stdout.flush()
        except ValueError as e:
            print(f"error: {e}", file=stderr)
            continue
        stdout.write("\n")
        stdout.flush()
        print(session.last_stats, file=stderr)
