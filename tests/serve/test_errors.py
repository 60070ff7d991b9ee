"""Every bad input gets its 4xx with OpenAI-style error JSON, and the server keeps serving."""

from __future__ import annotations

import pytest

from serve_helpers import MAX_BODY, MAX_LEN, post

MODEL = "tiny-chat"
GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


CASES = [
    # (what, path, body, status, a word the message must contain, param)
    ("malformed JSON", "/v1/completions", b'{"model": "tiny-chat", "prompt": ', 400, "not valid JSON", None),
    ("empty body", "/v1/completions", b"", 400, "empty", None),
    ("body not an object", "/v1/completions", [1, 2], 400, "JSON object", None),
    ("unknown model", "/v1/completions", GOOD | {"model": "gpt-4"}, 404, "does not exist", "model"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "required", "prompt"),
    ("wrong type", "/v1/completions", GOOD | {"max_tokens": "ten"}, 400, "integer", "max_tokens"),
    ("unknown field", "/v1/completions", GOOD | {"max_token": 5}, 400, "unknown field", "max_token"),
    ("temperature out of range", "/v1/completions", GOOD | {"temperature": 5}, 400, "2", "temperature"),
    ("top_p out of range", "/v1/completions", GOOD | {"top_p": 0}, 400, "greater than 0", "top_p"),
    ("negative max_tokens", "/v1/completions", GOOD | {"max_tokens": -1}, 400, "greater than", "max_tokens"),
    ("max_tokens over the limit", "/v1/completions", GOOD | {"max_tokens": 10_000}, 400, "at most", "max_tokens"),
    ("n out of range", "/v1/completions", GOOD | {"n": 0}, 400, "greater than", "n"),
    ("empty prompt", "/v1/completions", GOOD | {"prompt": ""}, 400, "empty", "prompt"),
    ("token id outside vocab", "/v1/completions", GOOD | {"prompt": [1, 99999]}, 400, "vocabulary", "prompt"),
    ("too many stops", "/v1/completions", GOOD | {"stop": list("abcde")}, 400, "at most 4", "stop"),
    ("unsupported penalty", "/v1/completions", GOOD | {"presence_penalty": 1.0}, 400, "not supported", None),
    ("logprobs over 5", "/v1/completions", GOOD | {"logprobs": 6}, 400, "less than or equal to 5", "logprobs"),
    ("prompt longer than context", "/v1/completions", GOOD | {"prompt": [5] * (MAX_LEN + 10)}, 400,
     "context", "prompt"),
    ("prompt + max_tokens over context", "/v1/completions", GOOD | {"prompt": [5] * (MAX_LEN - 10), "max_tokens": 20},
     400, "lower max_tokens", "max_tokens"),
    ("body over the size limit", "/v1/completions", GOOD | {"prompt": "x" * (MAX_BODY + 1)}, 413, "limit", None),
    ("empty messages", "/v1/chat/completions", CHAT | {"messages": []}, 400, "at least 1", "messages"),
    ("bad role", "/v1/chat/completions", CHAT | {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "system", "messages.0.role"),
    ("message without content", "/v1/chat/completions", CHAT | {"messages": [{"role": "user"}]}, 400,
     "required", "messages.0.content"),
    ("top_logprobs without logprobs", "/v1/chat/completions", CHAT | {"top_logprobs": 2}, 400, "logprobs: true",
     None),
    ("top_logprobs over 20", "/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 21}, 400,
     "less than or equal to 20", "top_logprobs"),
    ("stream_options without stream", "/v1/chat/completions", CHAT | {"stream_options": {"include_usage": True}},
     400, "stream", None),
    ("unknown route", "/v1/embeddings", GOOD, 404, "no route", None),
]


@pytest.mark.parametrize("what,path,body,status,word,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, what, path, body, status, word, param):
    got, payload = post(server.url, path, body)
    assert got == status, payload
    err = payload["error"]
    assert word.lower() in err["message"].lower(), err
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param


@pytest.mark.parametrize("key", [None, "wrong"])
def test_api_key_required(server, key):
    status, payload = post(server.url, "/v1/completions", GOOD, key=key)
    assert status == 401 and payload["error"]["type"] == "authentication_error"
    assert "API key" in payload["error"]["message"]


INVALID = [c for c in CASES if c[3] == 400 and isinstance(c[2], dict)]


@pytest.mark.parametrize("what,path,body,status,word,param", INVALID, ids=[c[0] for c in INVALID])
def test_openai_client_raises_bad_request_for_each_invalid_request(client, what, path, body, status, word, param):
    """What users' code catches: the SDK maps 400 to BadRequestError and keeps our message."""
    import httpx
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.post(path.removeprefix("/v1"), body=body, cast_to=httpx.Response)
    assert word.lower() in e.value.message.lower() and e.value.body["type"] == "invalid_request_error"


def test_openai_client_sees_typed_errors(client):
    import openai
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt=[5] * (MAX_LEN + 1), max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="wrong").models.list()
    # ... and the server still answers good requests afterwards.
    assert client.completions.create(model=MODEL, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_legacy_top_logprobs_keep_the_best_of_tokens_that_print_alike():
    """Two partial-UTF-8 tokens both print as U+FFFD: the dict keeps the higher logprob."""
    from dsv2.serve.app import _LogprobFormat

    class Tok:
        def token_bytes(self, t):
            return {1: b"\xe6", 2: b"\xb7", 3: b"a"}[t]

        def is_special(self, t):
            return False

    out = _LogprobFormat(Tok(), chat=False)([(3, -0.1, [(3, -0.1), (1, -0.5), (2, -1.5)])])
    assert out["top_logprobs"] == [{"a": -0.1, "\ufffd": -0.5}]


def test_text_offsets_count_invalid_bytes_as_one_character_each():
    """The text shows each invalid byte as U+FFFD: offsets after them must count them."""
    from dsv2.serve.app import _LogprobFormat

    class Tok:
        def token_bytes(self, t):
            return {1: b"a", 2: b"\xff", 3: b"\xe6\xb7", 4: b"\xb1", 5: b"b"}[t]

        def is_special(self, t):
            return False

    out = _LogprobFormat(Tok(), chat=False)([(t, -1.0, []) for t in (1, 2, 2, 3, 4, 5)])
    text = (b"a\xff\xff\xe6\xb7\xb1b").decode("utf-8", "replace")   # 'a' U+FFFD U+FFFD '深' 'b'
    assert out["text_offset"] == [0, 1, 2, 3, 3, 4] and len(text) == 5
