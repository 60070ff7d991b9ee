"""The FastAPI application: OpenAI-compatible routes over the continuous-batching scheduler.

    POST /v1/completions        text in, text out (stream: true for server-sent events)
    POST /v1/chat/completions   messages in, rendered with the model's chat template
    GET  /v1/models             the one model this server holds
    GET  /health                200 while the engine thread is alive, else 503
    GET  /metrics               Prometheus text: requests, tokens, queue, batch, cache, latencies

A request is parsed and checked in `prepare.py`, its jobs are queued on the scheduler, and
its answer is assembled here from the scheduler's events. If the client goes away before
the answer is complete, its jobs are cancelled and their cache slots freed.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .errors import APIError, error_body, install_handlers
from .prepare import Limits, prepare
from .scheduler import QueueFull, Scheduler
from .schemas import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
                      CompletionChoice, CompletionRequest, ModelCard, ModelList, Usage)

log = logging.getLogger("dsv2.serve")


def create_app(scheduler: Scheduler, tokenizer, limits: Limits, vocab_size: int) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        log.info("serving '%s': %s", limits.model_name, scheduler.capacity())
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="dsv2", summary="DeepSeek-V2 behind the OpenAI API", docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.scheduler, app.state.limits = scheduler, limits
    install_handlers(app)
    app.add_middleware(_Guard, limits=limits, metrics=scheduler.metrics)
    started = int(time.time())

    @app.get("/health")
    async def health():
        if scheduler.healthy:
            return {"status": "ok", "running": scheduler.batch_size, "waiting": scheduler.queue_depth}
        return JSONResponse(error_body(503, "the engine thread has stopped; restart the server."), 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(scheduler.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=limits.model_name, created=started, max_model_len=limits.max_context)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != limits.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist here; this server serves "
                                f"'{limits.model_name}'.", "model", "model_not_found")
        return ModelCard(id=model_id, created=started, max_model_len=limits.max_context)

    async def generate(request: Request, kind: type):
        req, jobs, events, n_prompt = await prepare(request, kind, limits, tokenizer, vocab_size)
        try:
            scheduler.submit(jobs)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except RuntimeError as e:
            raise APIError(503, str(e)) from None
        chat = kind is ChatCompletionRequest
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        # echo: each choice's text starts with its prompt, as decoded (the offsets below count on it)
        echo = None if chat or not req.echo else {job.index: tokenizer.decode(job.prompt_ids) for job in jobs}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = _sse(jobs, events, rid, limits.model_name, chat, n_prompt, include_usage, tokenizer, echo)
            return _SSEResponse(body, on_close=lambda: scheduler.cancel(jobs), media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            answer = await _until_done_or_gone(request, _collect(jobs, events))
        finally:
            scheduler.cancel(jobs)      # no-op for finished jobs; frees slots if the client left
        if answer is None:
            return Response(status_code=499)   # nobody is listening; uvicorn drops it
        texts, reasons, counts, lps = answer
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=sum(counts), total_tokens=n_prompt + sum(counts))
        want = req.logprobs if chat else req.logprobs is not None   # asked for: an object even if empty
        logprobs = [_LogprobFormat(tokenizer, chat)(lp) if want else None for lp in lps]
        if echo is not None:
            texts = [echo[i] + t for i, t in enumerate(texts)]
        if chat:
            choices = [ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r, logprobs=lp)
                       for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
            return ChatCompletion(id=rid, created=int(time.time()), model=limits.model_name, choices=choices,
                                  usage=usage)
        choices = [CompletionChoice(index=i, text=t, finish_reason=r, logprobs=lp)
                   for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
        return Completion(id=rid, created=int(time.time()), model=limits.model_name, choices=choices, usage=usage)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatCompletionRequest)

    return app


# ------------------------------------------------------------------ answers
async def _collect(jobs, events: asyncio.Queue):
    n = len(jobs)
    texts, reasons, counts, lps = [""] * n, [None] * n, [0] * n, [[] for _ in range(n)]
    left = n
    while left:
        ev = await events.get()
        if "error" in ev:
            raise APIError(ev.get("status", 503), ev["error"])
        i = ev["index"]
        texts[i] += ev["text"]
        lps[i] += ev.get("prompt_lp", [])
        if "lp" in ev:
            lps[i].append(ev["lp"])
        if "finish_reason" in ev:
            reasons[i], counts[i] = ev["finish_reason"], ev["completion_tokens"]
            left -= 1
    return texts, reasons, counts, lps


class _LogprobFormat:
    """(token id, logprob, [(id, logprob)]) entries -> OpenAI's logprobs object: for chat
    {"content": [{token, logprob, bytes, top_logprobs}]}, for completions the legacy
    {tokens, token_logprobs, top_logprobs, text_offset}. Every generated token is listed, a
    final EOS included (scoring harnesses count on one entry per generated token); with echo
    the prompt's tokens come first, the first without a logprob. A token holding part of a
    UTF-8 character shows U+FFFD in `token` and its exact bytes in `bytes` (chat). text_offset
    is where a token's text starts in the choice's text: the characters the bytes before it
    decode to, invalid bytes as U+FFFD as in the text (special tokens such as BOS add none,
    as the text skips them)."""

    def __init__(self, tokenizer, chat: bool):
        self.tok, self.chat = tokenizer, chat
        self.utf8, self.chars = codecs.getincrementaldecoder("utf-8")("replace"), 0

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        if self.tok is None:
            return str(token_id), b""
        b = self.tok.token_bytes(token_id)
        return b.decode("utf-8", errors="replace"), b

    def __call__(self, entries: list[tuple]) -> dict:
        if self.chat:
            content = []
            for t, lp, top in entries:
                s, b = self._piece(t)
                alts = []
                for a, v in top:
                    a_s, a_b = self._piece(a)
                    alts.append({"token": a_s, "logprob": v, "bytes": list(a_b)})
                content.append({"token": s, "logprob": lp, "bytes": list(b), "top_logprobs": alts})
            return {"content": content}
        tokens, offsets, tops = [], [], []
        for t, lp, top in entries:
            s, b = self._piece(t)
            tokens.append(s)
            offsets.append(self.chars)
            if self.tok is not None and not self.tok.is_special(t):
                self.chars += len(self.utf8.decode(b))
            alts = None if lp is None else {}
            for a, v in top if lp is not None else []:
                alts.setdefault(self._piece(a)[0], v)   # most likely first: tokens that print alike keep the best
            tops.append(alts)
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in entries], "top_logprobs": tops,
                "text_offset": offsets}


async def _until_done_or_gone(request: Request, work):
    """Await `work`; None if the client disconnects first (the caller then cancels the jobs)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            return None
        return task.result()
    finally:
        gone.cancel()


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _chunk(rid: str, model: str, chat: bool, index: int, text: str | None, finish: str | None,
           role: bool = False, logprobs: dict | None = None) -> str:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        obj = "text_completion"
    return _data({"id": rid, "object": obj, "created": int(time.time()), "model": model,
                  "choices": [choice], "usage": None})


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(jobs, events: asyncio.Queue, rid: str, model: str, chat: bool, n_prompt: int, include_usage: bool,
               tokenizer, echo: dict[int, str] | None = None):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. With echo, each
    choice's first chunk is the prompt (and its logprobs when asked for)."""
    fmts = {job.index: _LogprobFormat(tokenizer, chat) for job in jobs}  # text offsets run per choice
    echoed = set()
    if chat:
        for job in jobs:
            yield _chunk(rid, model, chat, job.index, None, None, role=True)
    left, completion_tokens = len(jobs), 0
    while left:
        ev = await events.get()
        if "error" in ev:
            yield _data(error_body(ev.get("status", 503), ev["error"]))
            return
        finish = ev.get("finish_reason")
        if echo is not None and ev["index"] not in echoed:
            echoed.add(ev["index"])
            lp = fmts[ev["index"]](ev["prompt_lp"]) if "prompt_lp" in ev else None
            yield _chunk(rid, model, chat, ev["index"], echo[ev["index"]], None, logprobs=lp)
        if ev["text"] or finish or "lp" in ev:
            lp = fmts[ev["index"]]([ev["lp"]]) if "lp" in ev else None
            yield _chunk(rid, model, chat, ev["index"], ev["text"], finish, logprobs=lp)
        if finish:
            left -= 1
            completion_tokens += ev["completion_tokens"]
    if include_usage:
        usage = {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens,
                 "total_tokens": n_prompt + completion_tokens}
        yield _data({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": int(time.time()), "model": model, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


class _SSEResponse(StreamingResponse):
    """A streaming response that always runs `on_close` when it ends, however it ends
    (finished, client disconnected, server shutdown), so no slot outlives its client."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
            await self.body_iterator.aclose()


# ---------------------------------------------------------------- middleware
class _Guard:
    """Pure ASGI middleware: API key on /v1 routes, and request counts by endpoint and status.

    (Starlette's BaseHTTPMiddleware is avoided: it wraps streaming bodies and can hide a
    client's disconnect from the response.)
    """

    def __init__(self, app, limits: Limits, metrics):
        self.app, self.limits, self.metrics = app, limits, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.limits.api_key and path.startswith("/v1") and not self._authorized(scope):
                resp = JSONResponse(error_body(401, "missing or wrong API key; send the header "
                                                    "'Authorization: Bearer <key>' with the server's --api-key.",
                                               code="invalid_api_key"), 401)
                return await resp(scope, receive, counting_send)
            return await self.app(scope, receive, counting_send)
        finally:
            endpoint = path if path in _ENDPOINTS else "other"
            self.metrics.inc("requests_total", endpoint=endpoint, status=str(status[0]))

    def _authorized(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        key = auth[7:] if auth.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode("latin-1")
        return secrets.compare_digest(key.strip(), self.limits.api_key)


_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}
