"""`dsv2 eval perplexity` against the same sliding-window computation done with transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsv2.cli import main
from dsv2.eval.perplexity import windows

TEXT = ("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog. 深度求索 "
        "class Stack:\n    def push(self, x):\n        self.items.append(x)\n") * 4


def reference_nll(model, ids: list[int], max_len: int, stride: int) -> tuple[float, int]:
    """The windows written out independently: window k reads ids[k*stride : k*stride + max_len], the
    last one ends at the end with a full window; each target is scored by the first window reaching it."""
    n, scored, nll, count, k = len(ids), 0, 0.0, 0, 0
    while scored < n - 1:
        b = k * stride
        e = min(b + max_len, n - 1)
        if b + max_len >= n - 1:
            b = max(0, n - 1 - max_len)
        logits = model(torch.tensor([ids[b:e]])).logits[0].double()
        logp = logits.log_softmax(-1)
        for t in range(max(scored + 1, b + 1), e + 1):
            nll -= float(logp[t - b - 1, ids[t]])
            count += 1
        scored, k = e, k + 1
    return nll, count


def test_windows_score_every_target_once():
    for n in (2, 7, 64, 65, 100, 257):
        for max_len, stride in ((16, 16), (16, 5), (64, 64), (200, 100)):
            seen = []
            for b, e, first in windows(n, max_len, stride):
                assert e - b <= max_len and first >= b + 1 and b >= 0 and e <= n - 1
                seen += range(first, e + 1)
            assert seen == list(range(1, n)), (n, max_len, stride)


@pytest.mark.parametrize("max_len,stride", [(64, 64), (64, 24), (50, 37), (512, 512)],
                         ids=["stride=max_len", "overlap", "stride-not-dividing", "text-shorter-than-window"])
def test_matches_transformers_sliding_window(hf_eval_checkpoint, tmp_path, capsys, max_len, stride):
    from transformers import AutoModelForCausalLM

    from dsv2.tokenizer import Tokenizer
    text = TEXT[:300] if max_len == 512 else TEXT
    doc = tmp_path / "doc.txt"
    doc.write_text(text)
    assert main(["eval", "perplexity", str(hf_eval_checkpoint), "--text", str(doc), "--max-len", str(max_len),
                 "--stride", str(stride), "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(got) == {"tokens", "nll", "ppl", "bits_per_byte", "bytes"}
    ids = Tokenizer(hf_eval_checkpoint).encode(text)
    assert ids[0] == 0   # add_bos_token: true, so BOS first and every text token is scored
    if max_len == 512:
        assert len(ids) < 512
    theirs = AutoModelForCausalLM.from_pretrained(hf_eval_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        nll, n = reference_nll(theirs, ids, max_len, stride)
    assert got["tokens"] == n == len(ids) - 1
    assert got["nll"] == pytest.approx(nll, rel=1e-4)
    assert got["bytes"] == len(text.encode())
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * len(text.encode())), rel=1e-4)


def test_several_files_are_summed_as_separate_documents(hf_eval_checkpoint, tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT[:300])
    b.write_text(TEXT[300:])
    out = {}
    for name, files in (("a", [a]), ("b", [b]), ("ab", [a, b])):
        assert main(["eval", "perplexity", str(hf_eval_checkpoint), "--text", *map(str, files), "--max-len", "64",
                     "--json"]) == 0
        out[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ab"]["tokens"] == out["a"]["tokens"] + out["b"]["tokens"]
    assert out["ab"]["nll"] == pytest.approx(out["a"]["nll"] + out["b"]["nll"], rel=1e-6)


def test_all_zero_logits_give_the_vocabulary_size(hf_eval_checkpoint, tmp_path):
    import dsv2
    from dsv2.eval.perplexity import perplexity, read_documents
    from dsv2.tokenizer import Tokenizer
    model = dsv2.load_pretrained(hf_eval_checkpoint)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT)
    r = perplexity(model, read_documents([doc], Tokenizer(hf_eval_checkpoint)), 64, 32)
    assert r["ppl"] == pytest.approx(model.config.vocab_size, rel=1e-5)


def test_context_curve_scores_the_same_tokens_and_draws_a_png(hf_eval_checkpoint, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text(TEXT * 2)
    png = tmp_path / "curve.png"
    assert main(["eval", "perplexity", str(hf_eval_checkpoint), "--text", str(doc), "--lengths", "32,64,128",
                 "--tail", "16", "--plot", str(png), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["max_len"] for r in rows] == [32, 64, 128] and {r["tokens"] for r in rows} == {16}
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    # the 128-token row by hand: the document's last 129 tokens, the final 16 scored
    import dsv2
    from dsv2.tokenizer import Tokenizer
    ids = Tokenizer(hf_eval_checkpoint).encode(TEXT * 2)[-129:]
    model = dsv2.load_pretrained(hf_eval_checkpoint)
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]]))[0].double().log_softmax(-1)
    nll = -sum(float(logp[t - 1, ids[t]]) for t in range(129 - 16, 129))
    assert rows[2]["nll"] == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("case,words", [
    ("missing", "no text file at"),
    ("empty", "is empty"),
    ("too-long", "over the model's context of 512"),
    ("bad-lengths", "--lengths takes a comma list"),
])
def test_bad_input_is_one_sentence(hf_eval_checkpoint, tmp_path, capsys, case, words):
    doc = tmp_path / "doc.txt"
    doc.write_text("" if case == "empty" else TEXT)
    args = ["eval", "perplexity", str(hf_eval_checkpoint), "--text", str(tmp_path / "nope.txt" if case == "missing" else doc)]
    args += {"too-long": ["--max-len", "4096"], "bad-lengths": ["--lengths", "a,b"]}.get(case, [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_perplexity_through_a_cache_format_and_quantized_weights(hf_eval_checkpoint, tmp_path, capsys):
    """--kv-cache-dtype scores each window through a latent cache of that format: a float32 cache
    gives the cache-free figure exactly (the path is right), 8-bit ones a little more; --quantize
    fp8 / int8 measure the weights' rounding the same way."""
    f = tmp_path / "a.txt"
    f.write_text(TEXT)

    def ppl(*extra):
        assert main(["eval", "perplexity", str(hf_eval_checkpoint), "--text", str(f), "--max-len", "64",
                     "--dtype", "float32", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    plain = ppl()
    assert ppl("--kv-cache-dtype", "float32")["nll"] == pytest.approx(plain["nll"], rel=1e-5)
    for extra in (("--kv-cache-dtype", "int8"), ("--kv-cache-dtype", "fp8"), ("--quantize", "int8"),
                  ("--quantize", "fp8")):
        got = ppl(*extra)
        assert got["tokens"] == plain["tokens"]
        assert got["nll"] != plain["nll"] and abs(got["nll"] / plain["nll"] - 1) < 0.1, extra
