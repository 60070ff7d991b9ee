"""The user's surface: `dsv2 generate`, `dsv2 chat` (history, prefix reuse, /clear, /exit), `dsv2 bench`."""

from __future__ import annotations

import io

import pytest

import dsv2
from dsv2.cli import main
from dsv2.engine.chat import ChatSession, repl

import _tiny


@pytest.mark.parametrize("verb", ["generate", "chat", "bench"])
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0 and verb in capsys.readouterr().out


def test_generate_prints_completions(tmp_path, capsys):
    ckpt = str(_tiny.checkpoint())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("深度求索\n\nThe quick\n", encoding="utf-8")
    assert main(["generate", ckpt, "Hello", "--file", str(prompts), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert out.out.count("--- [") == 3 and "tokens/s" in out.err and "bytes/token" in out.err
    assert main(["generate", ckpt]) == 2
    assert "no prompts" in capsys.readouterr().err
    assert main(["generate", ckpt, "hi", "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in capsys.readouterr().err


def test_chat_keeps_history_and_reuses_the_cached_prefix():
    llm = dsv2.LLM(_tiny.checkpoint(), compile=False)
    chat = ChatSession(llm)
    first = "".join(chat.send("你好", max_new_tokens=6))
    assert chat.messages[-1] == {"role": "assistant", "content": first}
    full1 = chat.last_prefill_tokens
    history = len(chat.ids)
    "".join(chat.send("Tell me more", max_new_tokens=6))
    new_turn = llm.tokenizer.encode("User: Tell me more\n\nAssistant:", add_bos=False)
    # Everything cached was reused: only the new turn, plus the reply's last token and the EOS
    # (sampled but never fed through the model), is prefilled.
    assert full1 > 5 and chat.last_prefill_tokens == len(new_turn) + 2
    assert len(chat.ids) == history + len(new_turn) + 6 + 1  # + reply + EOS
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    chat.clear()
    assert chat.messages == []


def test_chat_repl_commands():
    llm = dsv2.LLM(_tiny.checkpoint(), compile=False)
    session = ChatSession(llm)
    out, err = io.StringIO(), io.StringIO()
    stdin = io.StringIO("hello\n/clear\n/what\nsecond\n/exit\nnever read\n")
    assert repl(session, dict(max_new_tokens=3), stdin=stdin, stdout=out, stderr=err) == 0
    assert "[history cleared]" in err.getvalue() and "unknown command /what" in err.getvalue()
    assert err.getvalue().count("tokens/s") == 2
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["second"]


def test_bench_runs_both_engines(capsys):
    assert main(["bench", "--preset", "tiny", "--dtypes", "float32,int8", "--prefill-len", "16", "--prompt-len", "8",
                 "--new-tokens", "4", "--batches", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "dsv2 " in out and "transformers" in out and "ratio to transformers float32" in out
    assert "decode b2 tok/s" in out and "roofline" in out
    rows = [line.split("|")[:2] for line in out.splitlines() if line.count("|") > 5]
    assert [r[0].strip() for r in rows if r[1].strip() == "int8"] == ["dsv2"]  # int8 is dsv2's alone
    assert "dsv2 int8" in out   # and gets its ratio line


def test_chat_after_a_stop_string_feeds_the_model_what_the_history_says():
    """A stop string cuts the reply inside its sampled tokens; the next turn must not carry the cut
    text in its token ids, so it is rebuilt from the rendered history."""
    llm = dsv2.LLM(_tiny.checkpoint(), compile=False)
    probe = ChatSession(llm)
    text = "".join(probe.send("你好", max_new_tokens=12))
    assert len(text) >= 4
    stop = text[len(text) // 2]
    chat = ChatSession(llm)
    cut = "".join(chat.send("你好", max_new_tokens=12, stop=[stop]))
    assert stop not in cut and text.startswith(cut) and chat.messages[-1]["content"] == cut
    "".join(chat.send("again", max_new_tokens=3))
    tok = llm.tokenizer
    rendered = tok.apply_chat_template(chat.history()[:-1], add_generation_prompt=True)
    want = tok.encode(rendered, add_bos=False)
    assert chat.ids[:len(want)] == want
