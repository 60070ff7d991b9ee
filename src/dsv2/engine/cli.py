"""`dsv2 generate` and `dsv2 chat`.

    dsv2 generate CKPT "Once upon a time" "你好" --max-new-tokens 64
    dsv2 generate CKPT --file prompts.txt --temperature 0.8 --top-p 0.9 --seed 0   # one prompt per line
    dsv2 chat CKPT                                                                # /clear, /exit

CKPT is a Hugging Face checkpoint directory with tokenizer.json (+ tokenizer_config.json).
Throughput goes to stderr, so stdout holds only the generated text.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..options import add_dtype, add_runtime


def _sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, stop=args.stop)


def _load(args, slots: int):
    import torch

    from .llm import LLM
    if args.threads:
        torch.set_num_threads(args.threads)
    return LLM(args.model, dtype=args.dtype, compile=args.compile, quantize=args.quantize, native=args.native,
               kv_cache_dtype=args.kv_cache_dtype, max_len=args.max_len, max_batch_slots=slots)


def _max_len_arg(p) -> None:
    p.add_argument("--max-len", type=int, default=None,
                   help="longest sequence (prompt + new tokens) to hold; the memory pre-flight sizes the cache "
                        "by it (default: the model's context, planned at 4,096)")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="complete prompts with a checkpoint (batched)",
                       description="Complete each prompt (arguments, or --file with one prompt per line) "
                                   "and print the completions, one block per prompt.")
    g.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    g.add_argument("prompts", nargs="*", help="prompt texts")
    g.add_argument("--file", help="read prompts from this file, one per line")
    g.add_argument("--stream", action="store_true", help="print tokens as they come (one prompt at a time)")
    _sampling_args(g)
    _max_len_arg(g)
    add_dtype(g)
    add_runtime(g)
    g.set_defaults(func=_generate)

    c = sub.add_parser("chat", help="multi-turn chat in the terminal (/clear, /exit)",
                       description="A chat REPL: history is kept and its cached prefix reused across turns; "
                                   "tokens/s on stderr.")
    c.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    c.add_argument("--system", default=None, help="a system message")
    _sampling_args(c)
    _max_len_arg(c)
    add_dtype(c)
    add_runtime(c)
    c.set_defaults(func=_chat)


def _generate(args) -> int:
    prompts = list(args.prompts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FileNotFoundError(f"no prompt file at {path}.")
        prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give them as arguments or with --file.")
    llm = _load(args, slots=min(len(prompts), 16))
    t = time.perf_counter()
    if args.stream:
        n = 0
        for prompt in prompts:
            for chunk in llm.stream(prompt, **_sampling(args)):
                sys.stdout.write(chunk)
                sys.stdout.flush()
                n += 1
            sys.stdout.write("\n")
        dt = time.perf_counter() - t
        print(f"[{len(prompts)} prompts, {dt:.2f}s]", file=sys.stderr)
        return 0
    results = llm.generate(prompts, **_sampling(args))
    dt = time.perf_counter() - t
    for r in results:
        print(r.text if len(results) == 1 else f"--- [{r.finish_reason}]\n{r.text}")
    n = sum(len(r.token_ids) for r in results)
    eng = llm.last_engine
    print(f"[{len(results)} prompts, {n} new tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s; "
          f"KV cache {eng.cache.bytes_per_token():,} bytes/token]", file=sys.stderr)
    return 0


def _chat(args) -> int:
    from .chat import ChatSession, repl
    llm = _load(args, slots=1)
    session = ChatSession(llm, system=args.system, max_len=args.max_len)
    if sys.stdin.isatty():
        print("dsv2 chat: /clear forgets the conversation, /exit leaves.", file=sys.stderr)
    return repl(session, _sampling(args))
