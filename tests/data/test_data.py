"""Corpus reading, tokenizer training, shards + card, and the loader's exact position."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsv2.data.bpe import train_tokenizer
from dsv2.data.corpus import Skipped, default_corpus, iter_documents
from dsv2.data.loader import TokenLoader
from dsv2.data.shards import prepare_shards
from dsv2.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.py").write_text("def add(a, b):\n    return a + b\n" * 40)
    (root / "b.txt").write_text("déjà vu: 日本語 and emoji 🙂 survive byte-level BPE.\n" * 30)
    (root / "bad.py").write_bytes(b"x = '\xff\xfe not utf-8'\n")
    (root / "docs.jsonl").write_text("\n".join([json.dumps({"text": f"class C{i}:\n    pass\n" * 20}) for i in range(30)]
                                               + ["not json", json.dumps({"title": "no text"})]) + "\n")
    return root


def test_corpus_reports_and_skips_bad_input(corpus):
    skipped = Skipped()
    docs = list(iter_documents([corpus], skipped))
    assert len(docs) == 2 + 30
    reasons = {p.split("/")[-1]: why for p, why in skipped.items}
    assert "not UTF-8" in reasons["bad.py"]
    assert any("not valid JSON" in w for w in reasons.values()) and any("'text'" in w for w in reasons.values())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents([corpus / "missing"]))


def test_default_corpus_is_hand_written_stdlib():
    """Tests, codec tables and other generated files stay out; ordinary modules stay in."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = {p.relative_to(root).as_posix() for p in default_corpus()}
    assert {"argparse.py", "json/decoder.py", "asyncio/events.py"} <= rel
    assert not {"html/entities.py", "locale.py", "stringprep.py"} & rel
    for p in rel:
        parts = p.split("/")
        assert not {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages"} & set(parts[:-1]), p
        assert not parts[-1].startswith("_sysconfigdata"), p


def test_tokenizer_shards_and_card(corpus, tmp_path):
    tok_dir = train_tokenizer([corpus], tmp_path / "tok", vocab_size=300, verbose=False)
    tok = Tokenizer(tok_dir)
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.vocab_size <= 300
    text = "déjà vu 🙂 def f(x):\n    return x"
    assert tok.decode(tok.encode(text)) == text            # byte-level: exact round trip
    assert "Assistant:" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    card = prepare_shards([corpus], tok_dir, tmp_path / "data", val_fraction=0.1, shard_tokens=500, verbose=False)
    assert card["documents"]["train"] + card["documents"]["val"] == 32 and card["documents"]["val"] >= 1
    assert len(card["shards"]["train"]) > 1 and card["dtype"] == "uint16"
    stream = np.concatenate([np.fromfile(tmp_path / "data" / s["file"], dtype=np.uint16) for s in card["shards"]["train"]])
    assert stream.size == card["tokens"]["train"] and stream[0] == tok.bos_id
    assert (stream == tok.eos_id).sum() == card["documents"]["train"]
    assert 0 < card["unigram_val_loss"] < np.log(300) + 1
    assert [s["path"].split("/")[-1] for s in card["skipped"]][0] == "bad.py"


def test_loader_exact_position_and_disjoint_ranks(corpus, tmp_path):
    train_tokenizer([corpus], tmp_path / "tok", vocab_size=300, verbose=False)
    prepare_shards([corpus], tmp_path / "tok", tmp_path / "data", val_fraction=0.1, shard_tokens=700, verbose=False)
    a = TokenLoader(tmp_path / "data", "train", seq_len=16, seed=3)
    first = [a.next_batch(5) for _ in range(3)]
    state = a.state_dict()
    rest = [a.next_batch(7) for _ in range(a.n_windows // 7 + 2)]      # runs past an epoch boundary
    b = TokenLoader(tmp_path / "data", "train", seq_len=16, seed=3)
    b.load_state_dict(state)
    for x, y in zip(rest, [b.next_batch(7) for _ in range(len(rest))]):
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    # one epoch visits every window once
    c = TokenLoader(tmp_path / "data", "train", seq_len=16, seed=3)
    _, ids = c.next_batch(c.n_windows)
    assert sorted(ids.tolist()) == list(range(c.n_windows))
    # two ranks see disjoint windows
    r0 = TokenLoader(tmp_path / "data", "train", 16, 3, dp_rank=0, dp_size=2).next_batch(c.n_windows // 2)[1]
    r1 = TokenLoader(tmp_path / "data", "train", 16, 3, dp_rank=1, dp_size=2).next_batch(c.n_windows // 2)[1]
    assert not set(r0.tolist()) & set(r1.tolist())
    # targets are the inputs shifted by one inside each window
    assert first[0][0].shape == (5, 17)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(tmp_path / "data", "train", seq_len=8, seed=3).load_state_dict(state)
