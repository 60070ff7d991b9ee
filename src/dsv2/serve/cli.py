"""`dsv2 serve`: an OpenAI-compatible HTTP server with continuous batching.

    dsv2 serve path/to/checkpoint                          # http://127.0.0.1:8000/v1, 16 slots
    dsv2 serve path/to/checkpoint --slots 64 --max-len 1024 --dtype bfloat16 --api-key s3cret
    dsv2 serve path/to/checkpoint --quantize fp8 --kv-cache-dtype mixed --kv-cache-gb 4   # slots from a budget
    curl 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "checkpoint", "prompt": "Hello", "max_tokens": 16}'

The model name clients send is the checkpoint folder's name unless --model-name says
otherwise. At start the server logs how many tokens its latent cache holds and how many
requests can run at once (slots); --max-queue more may wait, beyond that clients get 429.
"""

from __future__ import annotations

import logging

from ..options import add_dtype, add_runtime


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over the OpenAI API (continuous batching)",
                       description="Serve a Hugging Face DeepSeek-V2 checkpoint through OpenAI-compatible "
                                   "/v1/completions and /v1/chat/completions, with continuous batching.")
    p.add_argument("model", help="checkpoint directory (config.json, safetensors, tokenizer.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    add_dtype(p)
    p.add_argument("--slots", type=int, default=16, help="sequences decoded together (cache slots; default 16)")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="size the cache to this many GiB instead: as many slots of --max-len positions as fit "
                        "in the --kv-cache-dtype format (overrides --slots)")
    p.add_argument("--max-len", type=int, default=None,
                   help="positions per slot: prompt + completion (default min(context, 2048))")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot (then 429)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="the largest max_tokens a request may ask for (default max-len - 1)")
    p.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request sends none")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request size limit (then 413)")
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens prefilled between two decode steps (bounds the stall a burst causes)")
    add_runtime(p)
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from .launch import build_server
    for name, v in (("--slots", args.slots), ("--prefill-budget", args.prefill_budget),
                    ("--max-body-bytes", args.max_body_bytes), ("--default-max-tokens", args.default_max_tokens)):
        if v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v}.")
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be 0 or more, got {args.max_queue}.")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}.")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_server(args.model, args.tokenizer, dtype=args.dtype, slots=args.slots, max_len=args.max_len,
                       max_queue=args.max_queue, model_name=args.model_name, api_key=args.api_key,
                       max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                       max_body_bytes=args.max_body_bytes, prefill_budget=args.prefill_budget,
                       compile=True if args.compile else None, quantize=args.quantize, native=args.native,
                       kv_cache_dtype=args.kv_cache_dtype, kv_cache_gb=args.kv_cache_gb)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0
