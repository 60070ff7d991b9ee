"""Assemble a server (model -> engine -> scheduler -> app) and run it under uvicorn.

`build_server` is what `dsv2 serve` calls; `ServerThread` runs the same app in a background
thread on a socket it binds itself (port 0 = a free port, no race), which is how the tests
and notebooks start a real server:

    from dsv2.serve.launch import build_server, ServerThread
    app = build_server("path/to/checkpoint", slots=8)
    with ServerThread(app) as srv:          # srv.url == "http://127.0.0.1:<port>"
        ...
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger("dsv2.serve")


def build_server(model_path, tokenizer_path=None, *, dtype=None, slots: int = 16, max_len: int | None = None,
                 max_queue: int = 256, model_name: str | None = None, api_key: str | None = None,
                 max_tokens_limit: int | None = None, default_max_tokens: int = 256,
                 max_body_bytes: int = 1 << 20, prefill_budget: int = 512, compile: bool | None = None,
                 quantize: str | None = None, native: bool | None = None, kv_cache_dtype: str | None = None,
                 kv_cache_gb: float | None = None):
    """-> a FastAPI app whose lifespan starts and stops the engine thread."""
    from ..checkpoint import load_pretrained
    from ..dtypes import parse_dtype
    from ..engine.engine import Engine
    from ..tokenizer import load_tokenizer
    from .app import create_app
    from .prepare import Limits
    from .scheduler import Scheduler

    model_path = Path(model_path)
    tok_path = Path(tokenizer_path) if tokenizer_path else model_path
    if not (tok_path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {tok_path}: the server needs the model's tokenizer; "
                                "pass --tokenizer DIR.")
    from ..checkpoint import empty_model
    from ..engine.memory import preflight
    meta, float_dtype = empty_model(model_path, parse_dtype(dtype), quantize)
    length = max_len or min(meta.config.max_position_embeddings, 2048)   # the Engine's default
    if kv_cache_gb is not None:   # as many slots of max_len positions as the budget holds in this format
        from ..engine.cache import bytes_per_token, slots_for
        per_token = bytes_per_token(meta.config, kv_cache_dtype, float_dtype)
        slots = slots_for(kv_cache_gb * 2**30, length, per_token)
        if slots < 1:
            raise ValueError(f"--kv-cache-gb {kv_cache_gb} holds no sequence of {length} positions at "
                             f"{per_token:,} bytes/token: raise it or lower --max-len.")
    preflight(model_path, parse_dtype(dtype), quantize, length, slots, kv_cache_dtype)
    model = load_pretrained(model_path, dtype=parse_dtype(dtype), quantize=quantize)
    tokenizer = load_tokenizer(tok_path, model.config.vocab_size)
    engine = Engine(model, tokenizer, max_batch_slots=slots, max_len=max_len, compile=compile, native=native,
                    kv_cache_dtype=kv_cache_dtype)
    scheduler = Scheduler(engine, max_queue=max_queue, prefill_budget=prefill_budget)
    limits = Limits(model_name=model_name or model_path.name, max_context=engine.max_len,
                    max_tokens_limit=max_tokens_limit or engine.max_len - 1,
                    default_max_tokens=default_max_tokens, max_body_bytes=max_body_bytes, api_key=api_key)
    return create_app(scheduler, tokenizer, limits, model.config.vocab_size)


class ServerThread:
    """uvicorn serving `app` from a background thread; a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()
        self.url = f"http://{self.host}:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="dsv2-uvicorn", daemon=True)

    def start(self, timeout: float = 60.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start within {timeout:.0f} s.")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
