"""DSV2LM through lm-evaluation-harness's own simple_evaluate, beside its HF model on the same checkpoint."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra dsv2[eval]")

QUESTIONS = [
    ("def add(a, b):\n    return", [" a + b", " a - b", " None", " add(a)"], 0),
    ("The quick brown fox jumps over the", [" lazy dog.", " fence", " moon and back", " 深度求索"], 0),
    ("Question: What is 12 plus 30?\nAnswer:", [" 42", " 12", " 30", " 1230"], 0),
    ("class Stack:\n    def push(self, x):\n       ", [" self.items.append(x)", " pass", " return x", " x"], 1),
    ("你好，", ["世界！", "模型", "深度求索发布了", "hello"], 0),
]
PROMPTS = ["def add(a, b):\n", "The quick brown", "Question: What is 12 plus 30?\nAnswer:", "class Stack:\n", "深度"]
DOCS = ["def add(a, b):\n    return a + b\n" * 12, "The quick brown fox jumps over the lazy dog. 1234567890 " * 9,
        "深度求索发布了新的混合专家语言模型。你好，世界！"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = {"mc": [{"question": q, "choices": c, "label": g} for q, c, g in QUESTIONS],
            "gen": [{"prompt": p, "answer": "x"} for p in PROMPTS],
            "roll": [{"text": t} for t in DOCS]}
    for name, docs in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in docs))
    head = "dataset_path: json\ntest_split: test\n"
    (d / "dsv2_mc.yaml").write_text(
        f"task: dsv2_mc\n{head}dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\ntarget_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n")
    (d / "dsv2_gen.yaml").write_text(
        f"task: dsv2_gen\n{head}dataset_kwargs:\n  data_files:\n    test: {d / 'gen.jsonl'}\noutput_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: answer\ntarget_delimiter: ''\n"
        "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 24\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    (d / "dsv2_roll.yaml").write_text(
        f"task: dsv2_roll\n{head}dataset_kwargs:\n  data_files:\n    test: {d / 'roll.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    return d


def evaluate(lm, task_dir, tasks):
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(task_dir)),
                                   log_samples=True, bootstrap_iters=0)


def resps(out, task):
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def both(hf_eval_checkpoint, task_dir):
    from lm_eval.models.huggingface import HFLM

    from dsv2.eval.harness import DSV2LM
    tasks = ["dsv2_mc", "dsv2_gen", "dsv2_roll"]
    ours = evaluate(DSV2LM(pretrained=str(hf_eval_checkpoint), dtype="float32", batch_size=4), task_dir, tasks)
    theirs = evaluate(HFLM(pretrained=str(hf_eval_checkpoint), dtype="float32", batch_size=1, device="cpu"), task_dir, tasks)
    return ours, theirs


def test_loglikelihoods_match_the_hf_model(both):
    ours, theirs = both
    a, b = resps(ours, "dsv2_mc"), resps(theirs, "dsv2_mc")
    assert len(a) == len(QUESTIONS) and [len(x) for x in a] == [4] * len(QUESTIONS)
    for qa, qb in zip(a, b):
        for (ll_a, greedy_a), (ll_b, greedy_b) in (( x[0], y[0]) for x, y in zip(qa, qb)):
            assert ll_a == pytest.approx(ll_b, rel=1e-4, abs=1e-4)
            assert greedy_a == greedy_b
    assert ours["results"]["dsv2_mc"]["acc,none"] == theirs["results"]["dsv2_mc"]["acc,none"]


def test_greedy_generation_is_identical(both):
    ours, theirs = both
    a, b = resps(ours, "dsv2_gen"), resps(theirs, "dsv2_gen")
    assert a == b and any(x[0][0] for x in a)   # and not all empty


def test_rolling_matches_the_hf_model_and_dsv2_eval_perplexity(both, hf_eval_checkpoint, tmp_path, capsys):
    from dsv2.cli import main
    ours, theirs = both
    a, b = resps(ours, "dsv2_roll"), resps(theirs, "dsv2_roll")
    for x, y in zip(a, b):
        assert x[0][0] == pytest.approx(y[0][0], rel=1e-4)
    for text, x in zip(DOCS, a):   # add_bos_token: true -> perplexity scores [BOS] + text too
        f = tmp_path / "doc.txt"
        f.write_text(text)
        assert main(["eval", "perplexity", str(hf_eval_checkpoint), "--text", str(f), "--max-len", "512",
                     "--stride", "512", "--json"]) == 0
        nll = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nll"]
        assert -x[0][0] == pytest.approx(nll, rel=1e-6)


def test_cli_runs_simple_evaluate(hf_eval_checkpoint, task_dir, tmp_path, capsys):
    from dsv2.cli import main
    out = tmp_path / "r.json"
    assert main(["eval", "harness", str(hf_eval_checkpoint), "--tasks", "dsv2_mc", "--include-path", str(task_dir),
                 "--out", str(out)]) == 0
    assert "dsv2_mc" in capsys.readouterr().out
    assert 0.0 <= json.loads(out.read_text())["dsv2_mc"]["acc,none"] <= 1.0
