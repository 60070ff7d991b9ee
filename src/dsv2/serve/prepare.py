"""From an HTTP body to engine jobs: parse, validate, render the chat template, tokenize, check limits.

Everything a request can get wrong is caught here, before it touches the engine, so a bad
request costs no slot and never disturbs the running batch.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.requests import Request

from .errors import APIError, validation_error
from ..engine.sampling import SamplingParams
from .scheduler import Job
from .schemas import ChatCompletionRequest, CompletionRequest


@dataclass
class Limits:
    """Server-wide limits (`dsv2 serve --help` sets them)."""
    model_name: str
    max_context: int                  # prompt + generated tokens per sequence (cache slot length)
    max_tokens_limit: int = 4096      # the largest max_tokens a request may ask for
    default_max_tokens: int = 256     # used when a request sends no max_tokens
    max_body_bytes: int = 1 << 20
    api_key: str | None = None


async def read_json(request: Request, limits: Limits) -> dict:
    """The body as a JSON object; 413 over the size limit, 400 if it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise _too_large(limits)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_body_bytes:
            raise _too_large(limits)
    if not body.strip():
        raise APIError(400, "the request body is empty; send a JSON object.")
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at position {e.pos}); "
                            "send a JSON object.") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, not a JSON {type(obj).__name__}.")
    return obj


def _too_large(limits: Limits) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limits.max_body_bytes:,} "
                         "bytes; shorten the prompt or raise --max-body-bytes.")


def parse(kind: type, obj: dict, limits: Limits):
    try:
        req = kind.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    if req.model != limits.model_name:
        raise APIError(404, f"the model '{req.model}' does not exist here; this server serves "
                            f"'{limits.model_name}' (see GET /v1/models).", "model", "model_not_found")
    return req


def prompt_ids(req: CompletionRequest | ChatCompletionRequest, tokenizer, vocab_size: int) -> list[list[int]]:
    """The token ids of each prompt: one for chat; for completions one per prompt, since `prompt`
    may be a string, a list of strings, a list of token ids or a list of such lists."""
    if isinstance(req, ChatCompletionRequest):
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001 - a template error is the request's fault, not the server's
            raise APIError(400, f"the chat template could not render these messages ({e}).", "messages") from None
        return [tokenizer.encode_chat(text)]
    out = []
    for prompt in req.prompts:
        if isinstance(prompt, str):
            out.append(tokenizer.encode(prompt))
            continue
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise APIError(400, f"'prompt': token id {bad[0]} is outside the vocabulary [0, {vocab_size}).", "prompt")
        out.append(list(prompt))
    return out


def max_new_tokens(req, n_prompt: int, limits: Limits) -> int:
    ctx = limits.max_context
    if n_prompt >= ctx:
        raise APIError(400, f"the prompt is {n_prompt} tokens but this model's context is {ctx} tokens "
                            "(prompt and completion together); shorten the prompt.", "messages"
                       if isinstance(req, ChatCompletionRequest) else "prompt", "context_length_exceeded")
    if req.max_tokens is None:
        return min(limits.default_max_tokens, ctx - n_prompt)
    if req.max_tokens > limits.max_tokens_limit:
        raise APIError(400, f"'max_tokens' is {req.max_tokens} but this server allows at most "
                            f"{limits.max_tokens_limit}; ask for fewer.", "max_tokens")
    if n_prompt + req.max_tokens > ctx:
        raise APIError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({req.max_tokens}) is more than "
                            f"this model's context of {ctx} tokens; lower max_tokens to at most "
                            f"{ctx - n_prompt}.", "max_tokens", "context_length_exceeded")
    return req.max_tokens


# Choices (prompts x n) one request may ask for.
MAX_CHOICES = 64


def logprobs_wanted(req) -> int | None:
    """How many alternatives per token the answer reports, or None for no logprobs."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    return (req.top_logprobs or 0) if req.logprobs else None


def make_jobs(req, prompts: list[list[int]], max_new: list[int]) -> tuple[list[Job], asyncio.Queue]:
    """n jobs per prompt sharing one event queue; choice index = prompt x n + j (OpenAI's order), and
    choice i uses seed + i so the answers differ but repeat."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    jobs = []
    for p, (ids, new_tokens) in enumerate(zip(prompts, max_new)):
        for j in range(req.n):
            i = p * req.n + j
            params = SamplingParams(max_new_tokens=new_tokens, temperature=req.temperature, top_k=req.top_k or None,
                                    top_p=req.top_p if req.top_p < 1.0 else None,
                                    seed=None if req.seed is None else req.seed + i, stop=list(req.stop_strings),
                                    ignore_eos=req.ignore_eos, logprobs=logprobs_wanted(req),
                                    prompt_logprobs=req.logprobs if getattr(req, "echo", False) else None)
            jobs.append(Job(list(ids), params, loop, events, index=i))
    return jobs, events


async def prepare(request: Request, kind: type, limits: Limits, tokenizer, vocab_size: int):
    """-> (validated request, jobs, their shared event queue, prompt tokens over all prompts)."""
    req = parse(kind, await read_json(request, limits), limits)
    prompts = prompt_ids(req, tokenizer, vocab_size)
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} is {len(prompts) * req.n} choices; this server "
                            f"answers at most {MAX_CHOICES} per request.", "prompt")
    max_new = [max_new_tokens(req, len(ids), limits) for ids in prompts]
    jobs, events = make_jobs(req, prompts, max_new)
    return req, jobs, events, sum(map(len, prompts))
