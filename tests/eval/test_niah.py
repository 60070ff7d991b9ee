"""`dsv2 eval niah`: prompt construction (depth, length, seeds), scoring, the grid run and its outputs."""

from __future__ import annotations

import json

import pytest

from dsv2.eval.niah import (ANSWER_TOKENS, MODES, _sentences, build_prompt, is_correct, make_key, parse_depths,
                            parse_lengths, run_niah)


@pytest.fixture(scope="module")
def tok(hf_eval_checkpoint):
    from dsv2.tokenizer import Tokenizer
    return Tokenizer(hf_eval_checkpoint)


def test_parse_lengths_and_depths():
    assert parse_lengths("1k, 2k,512,4096") == [512, 1024, 2048, 4096]
    assert parse_depths("0,10,...,100") == list(range(0, 101, 10))
    assert parse_depths("50,0,100") == [0, 50, 100]
    with pytest.raises(ValueError, match="token counts like"):
        parse_lengths("1m")
    with pytest.raises(ValueError, match="must lie in 0..100"):
        parse_depths("0,50,120")
    with pytest.raises(ValueError, match="0,10,...,100"):
        parse_depths("0,...,100")


@pytest.mark.parametrize("mode", ["niah", "passkey"])
@pytest.mark.parametrize("depth", [0, 10, 35, 50, 90, 100])
def test_needle_lands_at_its_depth_within_one_sentence(tok, mode, depth):
    p = build_prompt(tok, mode, 600, depth, "1234567")
    assert p.prompt_tokens <= 600
    needle = tok.encode(" " + MODES[mode]["needle"].format(key="1234567"), add_bos=False)
    assert p.ids[p.needle_at: p.needle_at + len(needle)] == needle
    start, end = p.haystack
    hay = (end - start) - len(needle)               # haystack tokens around the needle
    before = p.needle_at - start
    sentence = max(len(tok.encode(" " + s, add_bos=False)) for s in _sentences(mode))
    assert abs(before - depth / 100 * hay) <= sentence
    assert tok.decode(p.ids).rstrip().endswith(MODES[mode]["question"].strip().split()[-1])


def test_prompts_fill_but_never_pass_their_length(tok):
    for n in (256, 700, 2048):
        p = build_prompt(tok, "niah", n, 50, "7654321")
        assert n - 64 <= p.prompt_tokens <= n
    with pytest.raises(ValueError, match="leaves no room"):
        build_prompt(tok, "niah", 20, 50, "7654321")


def test_keys_are_seeded_per_cell():
    a = make_key(0, "niah", 1024, 50, 0)
    assert a == make_key(0, "niah", 1024, 50, 0) and len(a) == 7
    assert len({make_key(0, "niah", 1024, d, t) for d in range(0, 101, 10) for t in range(3)}) > 25
    assert a != make_key(1, "niah", 1024, 50, 0)
    assert len(make_key(0, "passkey", 512, 0, 1, digits=5)) == 5


def test_scorer_reads_multi_token_keys(tok):
    assert len(tok.encode("8675309", add_bos=False)) > 1     # the key spans several tokens here
    assert is_correct(" 8675309. Remember", "8675309")
    assert is_correct("8675309", "8675309")
    assert not is_correct(" 867530", "8675309")
    assert not is_correct(" 86753091", "8675309")
    assert not is_correct(" none", "8675309")


class _Echo:
    """An LLM stand-in that answers each prompt with the key its needle holds (or a wrong one)."""

    def __init__(self, llm, right: bool):
        self.model, self.tokenizer, self.right, self.calls = llm.model, llm.tokenizer, right, []

    def generate(self, prompts, max_new_tokens, temperature):
        import re
        self.calls.append(len(prompts))
        outs = []
        for ids in prompts:
            key = re.search(r"(?:code is|key is) (\d{7})", self.tokenizer.decode(ids)).group(1)
            outs.append(type("C", (), {"text": f" {key if self.right else '0000000'}."})())
        return outs


def test_grid_records_and_reproducibility(hf_eval_checkpoint, tok):
    from dsv2.engine import LLM
    llm = LLM(hf_eval_checkpoint, dtype="float32")
    a = run_niah(llm, [256, 400], [0, 50, 100], trials=2, seed=3, batch=4, progress=False)
    b = run_niah(llm, [256, 400], [0, 50, 100], trials=2, seed=3, batch=4, progress=False)
    assert a["results"] == b["results"]
    assert len(a["results"]) == 2 * 3 * 2
    r = a["results"][0]
    assert set(r) >= {"length", "depth", "trial", "correct", "prompt_tokens"} and isinstance(r["correct"], bool)
    assert all(x["prompt_tokens"] <= x["length"] for x in a["results"])
    c = run_niah(llm, [256], [50], trials=2, seed=4, progress=False)
    assert [x["key"] for x in c["results"]] != [x["key"] for x in a["results"] if x["length"] == 256
                                                 and x["depth"] == 50]
    right = run_niah(_Echo(llm, True), [256, 400], [0, 100], trials=3, progress=False, batch=5)
    wrong = run_niah(_Echo(llm, False), [256], [0, 100], progress=False)
    assert right["accuracy"] == 1.0 and all(v == 1.0 for v in right["cells"].values())
    assert wrong["accuracy"] == 0.0


def test_lengths_over_the_context_are_refused(hf_eval_checkpoint):
    from dsv2.engine import LLM
    llm = LLM(hf_eval_checkpoint, dtype="float32")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run_niah(llm, [512 - ANSWER_TOKENS + 1], [50], progress=False)


def test_cli_writes_json_and_heatmap(hf_eval_checkpoint, tmp_path, capsys):
    from dsv2.cli import main
    out = tmp_path / "niah"
    assert main(["eval", "niah", str(hf_eval_checkpoint), "--lengths", "384,448", "--depths", "0,50,100",
                 "--passkey", "--out", str(out), "--dtype", "float32"]) == 0
    report = json.loads((out / "niah.json").read_text())
    assert report["mode"] == "passkey" and len(report["results"]) == 6
    png = (out / "niah.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "passkey:" in capsys.readouterr().out
    assert main(["eval", "niah", str(hf_eval_checkpoint), "--lengths", "256", "--depths", "0,150"]) == 2
    assert main(["eval", "niah", str(hf_eval_checkpoint), "--lengths", "4k"]) == 2
    err = capsys.readouterr().err
    assert "must lie in 0..100" in err and "exceeds the model's context" in err
