"""The user's surface: every verb's --help, `dsv2 demo --fast` end to end, the export loads in transformers."""

import json
import math

import numpy as np
import pytest
import torch

from dsv2.cli import main


@pytest.mark.parametrize("argv", [["tokenizer", "train", "--help"], ["data", "prepare", "--help"],
                                  ["pretrain", "--help"], ["plot", "--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "usage" in capsys.readouterr().out


def test_bad_input_is_one_sentence(tmp_path, capsys):
    assert main(["pretrain", "--config", "tiny", "optim.lrr=1"]) == 2
    assert "unknown training config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["pretrain", "--config", "tiny", f"data.dir={tmp_path}"]) == 2
    assert "run `dsv2 data prepare" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2


def test_print_config(capsys):
    assert main(["pretrain", "--config", "tiny", "--print-config", "steps=3"]) == 0
    assert "steps: 3" in capsys.readouterr().out


def test_demo_fast_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for stage in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "step 8/8", "-\ndef", "-\nclass", "-\n    def",
                  "bits per byte vs the unigram baseline's"):
        assert stage in text
    for png in ("loss", "lr", "balance", "expert_load"):
        assert (out / "pretrain" / "plots" / f"{png}.png").stat().st_size > 1000
    recs = [json.loads(ln) for ln in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    kinds = {r["kind"] for r in recs}
    assert kinds == {"train", "val", "load"}
    train = [r for r in recs if r["kind"] == "train"]
    assert {"exp_bal", "dev_bal", "comm_bal", "drop_rate", "lr", "tokens_per_s"} <= set(train[-1])
    # the export loads in transformers, tokenizer included, and gives our logits
    from transformers import AutoTokenizer, DeepseekV2ForCausalLM

    from dsv2 import load_pretrained
    hf_dir = out / "pretrain" / "hf"
    theirs = DeepseekV2ForCausalLM.from_pretrained(hf_dir).eval()
    ours = load_pretrained(hf_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = torch.tensor([tok("def f(x):\n    return x")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    # held-out bits per byte: the transformers model's summed nll over the val windows, over the
    # UTF-8 bytes those windows' targets decode to; the unigram figure over the whole val text
    from dsv2.data.loader import TokenLoader
    from dsv2.demo import held_out_bits_per_byte
    from dsv2.tokenizer import Tokenizer
    card = json.loads((out / "data" / "card.json").read_text())
    bpb, unigram_bpb = held_out_bits_per_byte(hf_dir, out / "data", 64, card["unigram_val_loss"])
    val = TokenLoader(out / "data", "val", 64)
    nll, targets = 0.0, []
    with torch.no_grad():
        for rows in val.fixed_batches(val.n_windows, 1):
            logits = theirs(rows[:, :-1]).logits[0]
            nll += float(torch.nn.functional.cross_entropy(logits, rows[0, 1:], reduction="sum"))
            targets += rows[0, 1:].tolist()
    ours_tok = Tokenizer(hf_dir)
    assert bpb == pytest.approx(nll / (math.log(2) * len(ours_tok.decode(targets).encode())), rel=2e-3)
    every = np.concatenate([np.asarray(s) for s in val.shards])
    val_bytes = len(ours_tok.decode(every.tolist()).encode())
    assert unigram_bpb == pytest.approx(card["unigram_val_loss"] * every.size / (math.log(2) * val_bytes), rel=1e-6)
