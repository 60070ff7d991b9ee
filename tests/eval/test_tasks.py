"""`dsv2 eval tasks`: the Scorer against full forwards, the task format, few-shot prompts, built-ins."""

from __future__ import annotations

import json
import random

import pytest
import torch

import dsv2
from dsv2.cli import main
from dsv2.engine.score import Scorer
from dsv2.eval.tasks import load_task


def full_forward(model, ctx, cont):
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont]))[0].double().log_softmax(-1)
    rows = range(len(ctx) - 1, len(ctx) + len(cont) - 1)
    ll = sum(float(logp[r, t]) for r, t in zip(rows, cont))
    return ll, all(int(logp[r].argmax()) == t for r, t in zip(rows, cont))


def test_scorer_equals_full_forwards_with_shared_and_truncated_contexts(hf_eval_checkpoint):
    model = dsv2.load_pretrained(hf_eval_checkpoint)
    V = model.config.vocab_size
    rng = random.Random(0)
    pairs = []
    for q in range(7):   # questions of 1..4 choices, contexts of 1 to ~100 tokens, some shared far apart
        ctx = [0] + [rng.randrange(2, V) for _ in range(rng.choice([0, 3, 40, 100]))]
        pairs += [(ctx, [rng.randrange(2, V) for _ in range(rng.randint(1, 6))]) for _ in range(rng.randint(1, 4))]
    pairs.append((pairs[0][0], [5]))
    # a pair whose own greedy token is the continuation
    with torch.no_grad():
        g = int(model(torch.tensor([pairs[1][0]]))[0, -1].argmax())
    pairs.append((pairs[1][0], [g]))
    got = Scorer(model, batch_tokens=600, max_rows=5).loglikelihood(pairs)   # small batches: several runs
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ref_ll, ref_greedy = full_forward(model, ctx, cont)
        assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-5) and greedy == ref_greedy
    assert got[-1][1] is True
    # left truncation: context + continuation cut to max_len + 1 tokens
    long_ctx = [0] + [rng.randrange(2, V) for _ in range(80)]
    (ll, _), = Scorer(model, max_len=32).loglikelihood([(long_ctx, [7, 8, 9])])
    assert ll == pytest.approx(full_forward(model, long_ctx[-30:], [7, 8, 9])[0], rel=1e-5)
    with pytest.raises(ValueError, match="ints in"):
        Scorer(model).loglikelihood([([0], [V])])


def test_context_and_choices_in_one_sequence_equal_full_forwards(hf_eval_checkpoint):
    """A context and its choices run as one sequence under a tree mask (engine/score.py): choices
    of different lengths (a 1-token one is predicted by the context's last token alone), contexts
    cut differently per choice by left truncation, a context with more choices than one sequence
    holds, sequences of different lengths in one batch, greedy flags over whole continuations."""
    model = dsv2.load_pretrained(hf_eval_checkpoint)
    V = model.config.vocab_size
    rng = random.Random(1)

    def toks(n):
        return [rng.randrange(2, V) for _ in range(n)]

    ids = [0] + toks(10)   # a continuation greedy at every token, and one greedy at its first only
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    ctx, greedy = ids[:11], ids[11:]
    pairs = [(ctx, greedy), (ctx, greedy[:1] + [(greedy[1] + 1) % V])]
    pairs += [([0], toks(n)) for n in (1, 3, 7)]
    long_ctx = [0] + toks(45)   # over max_len: each choice keeps its own number of context tokens
    pairs += [(long_ctx, toks(n)) for n in (2, 9, 1)]
    many = [0] + toks(5)        # 10 choices of 6 tokens: more than one 32-token sequence
    pairs += [(many, toks(6)) for _ in range(10)]
    pairs += [([0] + toks(n), toks(3)) for n in (2, 20)]
    max_len = 32
    scorer = Scorer(model, max_len=max_len, batch_tokens=100, max_rows=3)
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ref_ll, ref_greedy = full_forward(model, ctx[-(max_len + 1 - len(cont)):], cont)
        assert ll == pytest.approx(ref_ll, rel=1e-5, abs=1e-5) and greedy == ref_greedy
    assert got[0][1] is True and got[1][1] is False
    # through a float32 latent cache a float32 model scores the same
    cached = Scorer(model, max_len=max_len, kv_cache_dtype="float32").loglikelihood(pairs)
    assert [ll for ll, _ in cached] == pytest.approx([ll for ll, _ in got], rel=1e-5, abs=1e-5)


def write_task(tmp_path, **keys):
    import yaml
    docs = [{"q": f"{a} + {a}", "choices": [str(2 * a), str(2 * a + 1), "x"], "label": 0, "answer": str(2 * a)}
            for a in range(12)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {"task": "add", "output_type": "multiple_choice", "dataset": {"test": "docs.jsonl"},
            "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "choices", "doc_to_target": "label"} | keys
    path = tmp_path / "add.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def test_fewshot_prompts_are_seeded_per_document_and_leave_the_document_out(tmp_path):
    task = load_task(str(write_task(tmp_path, num_fewshot=3, fewshot_seed=7, description="Sums.\n\n")))
    ctx = task.context(4, 3)
    assert ctx.startswith("Sums.\n\n") and ctx.endswith("Q: 4 + 4\nA:") and ctx.count("Q: ") == 4
    assert "Q: 4 + 4\nA: 8" not in ctx                       # never its own answer
    assert task.context(4, 3) == ctx                         # the same examples every time
    shots = [line for line in ctx.split("\n\n")[1:-1]]
    assert all(s.split("\nA: ")[1] == str(2 * int(s.split()[1])) for s in shots)   # each example with its answer
    assert load_task(str(write_task(tmp_path, num_fewshot=3, fewshot_seed=8))).context(4, 3) != ctx.removeprefix("Sums.\n\n")


@pytest.mark.parametrize("keys,words", [
    ({"doc_to_txt": "{{q}}"}, "unknown key 'doc_to_txt'"),
    ({"output_type": "ranking"}, "output_type 'ranking' is not one of"),
    ({"dataset": {"test": "missing.jsonl"}}, "does not exist"),
    ({"doc_to_choice": "options"}, "names the field 'options'"),
    ({"doc_to_text": "{{question}}"}, "doc_to_text '{{question}}' failed"),
])
def test_bad_task_files_are_one_sentence(hf_eval_checkpoint, tmp_path, capsys, keys, words):
    path = write_task(tmp_path, **keys)
    assert main(["eval", "tasks", str(hf_eval_checkpoint), "--tasks", str(path)]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_task_name_lists_the_built_ins(hf_eval_checkpoint, capsys):
    assert main(["eval", "tasks", str(hf_eval_checkpoint), "--tasks", "hellaswagg"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'hellaswagg'" in err and "python_mc" in err and "mmlu" in err


def test_multiple_choice_records_follow_the_loglikelihoods(hf_eval_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "tasks", str(hf_eval_checkpoint), "--tasks", str(write_task(tmp_path)), "--limit", "6",
                 "--out", str(out)]) == 0
    assert "acc_norm" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "samples_add.jsonl").read_text().splitlines()]
    model = dsv2.load_pretrained(hf_eval_checkpoint)
    from dsv2.eval.runner import encode_pair
    from dsv2.tokenizer import Tokenizer
    tok = Tokenizer(hf_eval_checkpoint)
    for r in records:
        for choice, ll in zip(r["choices"], r["loglikelihoods"]):
            assert ll == pytest.approx(full_forward(model, *encode_pair(tok, r["context"], " " + choice))[0], rel=1e-5)
        lls = r["loglikelihoods"]
        assert r["acc"] == float(lls.index(max(lls)) == r["gold"])
        norm = [ll / len(c) for ll, c in zip(lls, r["choices"])]
        assert r["acc_norm"] == float(norm.index(max(norm)) == r["gold"])
    res = json.loads((out / "results.json").read_text())["results"]["add"]
    assert res["n"] == 6 and res["acc"] == pytest.approx(sum(r["acc"] for r in records) / 6)


def test_encode_pair_moves_the_contexts_trailing_space(hf_eval_checkpoint):
    from dsv2.eval.runner import encode_pair
    from dsv2.tokenizer import Tokenizer
    tok = Tokenizer(hf_eval_checkpoint)
    ctx, cont = encode_pair(tok, "The quick brown ", "fox")
    assert ctx + cont == tok.encode("The quick brown fox") and tok.decode(cont) == " fox"


def test_generation_extracts_and_compares(tmp_path):
    task = load_task("arithmetic")
    assert task.extract(" 42\n") == "42" and task.extract(" -7 apples") == "-7" and task.extract(" none") == "[invalid]"
    doc = task.docs["test"][0]
    assert task.target(doc) == str(eval(f"{doc['a']} {'+' if doc['op'] == 'plus' else '-'} {doc['b']}"))
    assert load_task("arithmetic").docs == task.docs                     # seeded: the same documents
    gsm = load_task("gsm8k:dataset.test=" + str(_gsm(tmp_path)) + ",dataset.train=" + str(_gsm(tmp_path)))
    assert gsm.extract("so 3 + 4 = 7.\n#### 7") == "7" == gsm.target(gsm.docs["test"][0])


def _gsm(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text(json.dumps({"question": "3 + 4?", "answer": "3 + 4 = 7\n#### 7"}) + "\n")
    return f


def test_mmlu_template_renders_the_papers_format(tmp_path):
    f = tmp_path / "mmlu.jsonl"
    f.write_text("".join(json.dumps({"question": f"Q{i}?", "choices": ["a", "b", "c", "d"], "answer": i % 4}) + "\n"
                         for i in range(6)))
    task = load_task(f"mmlu:dataset.test={f},dataset.dev={f}")
    ctx = task.context(0, 2)
    assert ctx.startswith("The following are multiple choice questions (with answers).\n\n")
    assert ctx.endswith("Q0?\nA. a\nB. b\nC. c\nD. d\nAnswer:") and ctx.count("Answer:") == 3
    assert task.choices(task.docs["test"][0]) == ["A", "B", "C", "D"] and task.gold(task.docs["test"][3]) == 3


def test_builtin_tasks_run_end_to_end(hf_eval_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["eval", "tasks", str(hf_eval_checkpoint), "--tasks", "python_mc", "copy", "reverse",
                 "passkey:dataset.args.length=200", "python_bpb", "--limit", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("python_mc", "copy", "reverse", "passkey", "python_bpb", "bits_per_byte"):
        assert name in text
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["python_mc"]["chance"] == 0.25 and res["python_bpb"]["bits_per_byte"] > 0
    for r in map(json.loads, (out / "samples_copy.jsonl").read_text().splitlines()):
        assert r["exact_match"] == float(r["extracted"] == r["target"]) and r["prompt"].startswith("Copy: ")
    key = json.loads((out / "samples_passkey.jsonl").read_text().splitlines()[0])
    assert f"The pass key is {key['target']}." in key["prompt"]
