"""The OpenAI surface, driven by the official `openai` client against a real server."""

from __future__ import annotations

import json
import urllib.request

import torch

from serve_helpers import MAX_LEN

MODEL = "tiny-chat"
PROMPT = "Multi-head latent attention"
NO_EOS = {"ignore_eos": True}       # random weights: make token counts exact


def test_models_health_and_capacity(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"
    assert "holds 1,024 tokens" in server.app.state.scheduler.capacity()
    assert "at most 4 requests run at once" in server.app.state.scheduler.capacity()


def test_completion_max_tokens_and_usage(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NO_EOS)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_greedy_matches_offline_engine(model_dir, client):
    from dsv2.engine.llm import LLM
    llm = LLM(model_dir, max_batch_slots=1, compile=False)
    [want] = llm.generate([PROMPT], max_new_tokens=20, temperature=0.0, ignore_eos=True)
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, extra_body=NO_EOS)
    assert got.choices[0].text == want.text
    # Token ids as the prompt give the same answer as the text they encode.
    ids = llm.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0, extra_body=NO_EOS)
    assert by_ids.choices[0].text == want.text


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, prompt="深度求索 🙂", max_tokens=24, temperature=0.9, seed=3, extra_body=NO_EOS)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_streaming_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好，世界！"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=16, temperature=0, extra_body=NO_EOS)
    r = client.chat.completions.create(**kw)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_uses_the_chat_template(model_dir, client):
    from dsv2 import Tokenizer
    tok = Tokenizer(model_dir)
    messages = [{"role": "user", "content": "hello there"}]
    want = len(tok.encode(tok.apply_chat_template(messages), add_bos=False))
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert r.usage.prompt_tokens == want


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, extra_body=NO_EOS)
    full = client.completions.create(**kw).choices[0].text
    stop = full[12:15]                      # a stop string the model is known to produce
    cut = full[:full.index(stop)]
    r = client.completions.create(stop=[stop, "never appears"], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_seed_reproducible(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=1.0, top_p=0.95, extra_body=NO_EOS)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c


def test_n_choices(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1, n=3,
                                  extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert len({c.text for c in r.choices}) > 1        # seeds 1, 2, 3


def test_n_choices_streamed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1, n=2, extra_body=NO_EOS)
    whole = client.completions.create(**kw)
    texts = ["", ""]
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in whole.choices]


def test_default_max_tokens_and_context_clamp(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, extra_body=NO_EOS)
    assert r.usage.completion_tokens == 32              # the server's --default-max-tokens
    long = [5] * (MAX_LEN - 4)
    r = client.completions.create(model=MODEL, prompt=long, temperature=0, extra_body=NO_EOS)
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_metrics_count_requests_and_tokens(server, client):
    from dsv2.serve.metrics import parse_prometheus
    before = parse_prometheus(urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode())
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, extra_body=NO_EOS)
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    after = parse_prometheus(text)
    assert after["dsv2_generation_tokens_total"] - before["dsv2_generation_tokens_total"] == 5
    ok = 'dsv2_requests_total{endpoint="/v1/completions",status="200"}'
    assert after[ok] - before.get(ok, 0) == 1
    for name in ("dsv2_queue_depth", "dsv2_running_requests", "dsv2_cache_used_tokens", "dsv2_cache_capacity_tokens",
                 "dsv2_time_to_first_token_seconds_count", "dsv2_inter_token_latency_seconds_count"):
        assert name in after, name
    assert after["dsv2_cache_capacity_tokens"] == 1024


def test_logprobs_completions_and_chat(model_dir, client):
    """Completions (legacy shape) and chat (content shape) report each token's logprob as the offline
    engine computes it, with the asked number of alternatives; streamed chunks carry the same."""
    from dsv2.engine.llm import LLM
    llm = LLM(model_dir, max_batch_slots=1, compile=False)
    [want] = llm.generate(["深度求索 🙂"], max_new_tokens=10, ignore_eos=True, logprobs=2)
    kw = dict(model=MODEL, prompt="深度求索 🙂", max_tokens=10, temperature=0, extra_body=NO_EOS)
    choice = client.completions.create(logprobs=2, **kw).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert all(abs(a - b) < 1e-4 for a, b in zip(lp.token_logprobs, want.logprobs))
    assert all(len(t) == 2 and max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    offs = lp.text_offset
    assert offs[0] == 0 and offs == sorted(offs) and offs[-1] <= len(choice.text)
    streamed = [c.choices[0].logprobs for c in client.completions.create(stream=True, logprobs=2, **kw)
                if c.choices and c.choices[0].logprobs]
    assert torch.allclose(torch.tensor([x for c in streamed for x in c.token_logprobs]),
                          torch.tensor(lp.token_logprobs), atol=1e-5)
    assert client.completions.create(**kw).choices[0].logprobs is None

    messages = [{"role": "user", "content": "你好"}]
    chat = dict(model=MODEL, messages=messages, max_tokens=8, temperature=0, extra_body=NO_EOS)
    r = client.chat.completions.create(logprobs=True, top_logprobs=3, **chat)
    content = r.choices[0].logprobs.content
    assert len(content) == 8 and all(len(c.top_logprobs) == 3 for c in content)
    # greedy: the chosen token is the most likely one; the bytes spell the answer exactly
    assert all(c.top_logprobs[0].logprob == c.logprob for c in content)
    assert bytes(b for c in content for b in c.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    chunks = [c.choices[0].logprobs for c in client.chat.completions.create(stream=True, logprobs=True, **chat)
              if c.choices and c.choices[0].logprobs]
    assert torch.allclose(torch.tensor([x.logprob for c in chunks for x in c.content]),
                          torch.tensor([c.logprob for c in content]), atol=1e-5)
    assert [x.top_logprobs for c in chunks for x in c.content] == [[]] * 8


def test_echo_scores_the_prompt(model_dir, client):
    """echo + logprobs (how evaluation harnesses score a text): the prompt comes back in front of
    the completion with its tokens' logprobs, equal to the offline engine's prompt logprobs."""
    from dsv2.engine.llm import LLM
    llm = LLM(model_dir, max_batch_slots=1, compile=False)
    prompt = "深度求索 is a model"
    [want] = llm.generate([prompt], max_new_tokens=1, prompt_logprobs=1)
    n_prompt = len(want.prompt_logprobs)
    kw = dict(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True, extra_body=NO_EOS)
    r = client.completions.create(logprobs=1, **kw).choices[0]
    assert r.text.startswith(prompt) and len(r.text) > len(prompt)
    lp = r.logprobs
    assert len(lp.token_logprobs) == n_prompt + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:n_prompt]),
                          torch.tensor([x for x, _ in want.prompt_logprobs[1:]]), atol=1e-4)
    streamed = [c.choices[0] for c in client.completions.create(stream=True, logprobs=1, **kw) if c.choices]
    assert streamed[0].text == prompt and len(streamed[0].logprobs.token_logprobs) == n_prompt
    assert "".join(c.text for c in streamed) == r.text
    assert client.completions.create(**kw).choices[0].text == r.text  # echo without logprobs
    # text_offset indexes the returned text: on an ASCII prompt each token's span is its text
    # (BOS, a special token, spans nothing).
    ascii_prompt = dict(kw, prompt=PROMPT)
    r = client.completions.create(logprobs=0, **ascii_prompt).choices[0]
    offs, toks = r.logprobs.text_offset, r.logprobs.tokens
    n = len(llm.tokenizer.encode(PROMPT))
    assert r.text.startswith(PROMPT) and offs[0] == offs[1] == 0
    assert all(r.text[offs[i]: offs[i + 1]] == toks[i] for i in range(1, n - 1))


def test_several_prompts_as_token_lists(model_dir, server):
    """`prompt` as a list of token-id lists (what lm-evaluation-harness sends): one choice per
    prompt and n, in order; with echo each scores its own prompt."""
    from serve_helpers import post
    from dsv2.engine.llm import LLM
    llm = LLM(model_dir, max_batch_slots=1, compile=False)
    ids = [llm.tokenizer.encode(t, add_bos=False) for t in ("Multi-head latent", "深度求索 🙂")]
    status, body = post(server.url, "/v1/completions",
                        dict(model=MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1, n=2,
                             ignore_eos=True))
    assert status == 200, body
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        p = ids[c["index"] // 2]
        assert len(c["logprobs"]["token_logprobs"]) == len(p) + 1
        assert c["text"].startswith(llm.tokenizer.decode(p))
    [want] = llm.generate([ids[1]], max_new_tokens=1, prompt_logprobs=0)
    got = choices[2]["logprobs"]["token_logprobs"][1: len(ids[1])]
    assert torch.allclose(torch.tensor(got), torch.tensor([x for x, _ in want.prompt_logprobs[1:]]), atol=1e-4)
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids))
