"""Chat data: the template against DeepSeek-V2's official one, assistant-only labels, no drift, bad rows."""

from __future__ import annotations

import json

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsv2.align.conversations import (generation_prompt_ids, read_conversations, segments, shifted,
                                      tokenize_conversation)
from dsv2.data.bpe import BOS, EOS
from dsv2.model.loss import IGNORE_INDEX
from dsv2.tokenizer import Tokenizer

# tokenizer_config.json's chat_template of deepseek-ai/DeepSeek-V2-Chat, as published.
OFFICIAL = ("{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
            "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
            "{{ 'User: ' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}"
            "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
            "{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
            "{{ 'Assistant:' }}{% endif %}")

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
MULTI = [{"role": "user", "content": "你好！What is 3 plus 4?"}, {"role": "assistant", "content": "7 🙂"},
         {"role": "user", "content": "再说一遍 ✨"}, {"role": "assistant", "content": "七，也就是 7。🚀"}]
CASES = {"single": MULTI[:2], "system": [SYSTEM] + MULTI[:2], "multi": MULTI, "system_multi": [SYSTEM] + MULTI,
         "open": MULTI[:3]}


def official(messages, add_generation_prompt):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(OFFICIAL).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=BOS, eos_token=EOS)


@pytest.fixture(scope="module")
def tok(ds_tok_dir):
    return Tokenizer(ds_tok_dir)


def test_golden_strings(tok):
    assert tok.apply_chat_template(CASES["system"], add_generation_prompt=False) == (
        f"{BOS}You are a helpful assistant.\n\nUser: 你好！What is 3 plus 4?\n\nAssistant: 7 🙂{EOS}")
    assert tok.apply_chat_template(MULTI[:1], add_generation_prompt=True) == f"{BOS}User: 你好！What is 3 plus 4?\n\nAssistant:"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("gen", [False, True])
def test_default_template_renders_as_the_official_one(tok, case, gen):
    assert tok.apply_chat_template(CASES[case], add_generation_prompt=gen) == official(CASES[case], gen)


@pytest.mark.parametrize("case", ["single", "system", "multi", "system_multi"])
def test_pieces_join_to_the_official_rendering(tok, case):
    pieces = segments(tok, CASES[case])
    assert "".join(t for t, _ in pieces) == official(CASES[case], False)
    answers = [t for t, a in pieces if a]
    assert answers == [f" {m['content']}{EOS}" for m in CASES[case] if m["role"] == "assistant"]


def answer_runs(ids, labels):
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert l == i           # labels are the unshifted ids
            cur.append(i)
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("case", ["single", "system_multi", "open"])
def test_supervised_tokens_are_exactly_each_answer_with_eos(tok, case):
    msgs = CASES[case]
    ids, labels = tokenize_conversation(tok, msgs)
    runs = answer_runs(ids, labels)
    expected = [f" {m['content']}{EOS}" for m in msgs if m["role"] == "assistant"]
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == expected
    assert all(r[-1] == tok.eos_id for r in runs)
    assert ids[0] == tok.bos_id and labels[0] == IGNORE_INDEX
    # a trailing user turn teaches nothing and is left out
    assert tok.decode(ids, skip_special_tokens=False) == official(msgs[:msgs_end(msgs)], False)


def msgs_end(msgs):
    return max(i for i, m in enumerate(msgs) if m["role"] == "assistant") + 1


def test_ids_before_each_answer_are_its_generation_prompt(tok):
    msgs = CASES["system_multi"]
    ids, labels = tokenize_conversation(tok, msgs)
    starts = [j for j in range(len(ids)) if labels[j] != IGNORE_INDEX and (j == 0 or labels[j - 1] == IGNORE_INDEX)]
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for start, turn in zip(starts, turns):
        assert ids[:start] == generation_prompt_ids(tok, msgs[:turn])


def test_no_drift_when_bpe_would_merge_across_the_boundary(tmp_path):
    """A tokenizer without a pre-tokenizer split merges ':' with the answer's ' 7': encoding the
    whole text would change the prompt's last token. The pieces keep the prompt's own ids."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers
    tk = HF(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(["User: a\n\nAssistant: 7"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))
    tok = Tokenizer(tmp_path)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "7"}]
    prompt = generation_prompt_ids(tok, msgs[:1])
    whole = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False), add_bos=False)
    assert whole[:len(prompt)] != prompt            # the naive way drifts with this tokenizer
    ids, labels = tokenize_conversation(tok, msgs)
    start = next(j for j, l in enumerate(labels) if l != IGNORE_INDEX)
    assert ids[:start] == prompt
    assert tok.decode(ids[start:], skip_special_tokens=False) == f" 7{EOS}"


def test_a_tokenizers_own_template_is_used(tmp_path, ds_tok_dir):
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    (tmp_path / "tokenizer.json").write_bytes((ds_tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "add_bos_token": False, "chat_template": chatml}))
    tok = Tokenizer(tmp_path)
    msgs = CASES["multi"]
    ref = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chatml)
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == ref.render(messages=msgs,
                                                                                    add_generation_prompt=False)
    ids, labels = tokenize_conversation(tok, msgs)
    assert [tok.decode(r, skip_special_tokens=False) for r in answer_runs(ids, labels)] == \
        [f"{m['content']}<|im_end|>\n" for m in msgs if m["role"] == "assistant"]


def test_shifted_targets_predict_the_next_label():
    ids, targets = shifted([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8])
    assert targets == [IGNORE_INDEX, 7, 8, IGNORE_INDEX] and ids == [5, 6, 7, 8]


def test_bad_rows_are_reported_by_line_and_skipped(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": []},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": ["not", "text"]}, {"role": "assistant", "content": "x"}]},
        "not json {",
        {"prompt": "2+2?", "completion": "4"},
        {"text": "neither shape"},
    ]
    f = tmp_path / "chats.jsonl"
    f.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    convs = read_conversations(f)
    assert len(convs.messages) == 2 and convs.messages[1][1] == {"role": "assistant", "content": "4"}
    why = dict(convs.skipped)
    assert set(why) == {2, 3, 4, 5, 6, 8}
    assert "unknown role 'robot'" in why[2] and "empty" in why[3] and "no assistant turn" in why[4]
    assert "not a string" in why[5] and "not JSON" in why[6] and "'prompt' and 'completion'" in why[8]


def test_a_file_with_no_usable_row_is_refused(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="no usable conversation; line 1: the conversation is empty"):
        read_conversations(f)
    with pytest.raises(FileNotFoundError, match="no conversation file"):
        read_conversations(tmp_path / "missing.jsonl")
