"""`dsv2 data prepare`: tokenise a corpus into memory-mapped token shards plus a JSON card.

Each document becomes BOS + tokens + EOS, appended to a flat stream. Every
`round(1 / val_fraction)`-th document goes to the `val` split, the rest to `train`
(whole documents, so validation text is never seen in training). A split is written as
`<split>_00000.bin, ...`: raw little-endian uint16 (vocab <= 65536) or uint32 arrays that
`numpy.memmap` opens without reading them.

`card.json` records documents, tokens and vocab per split, the shard files, the files
skipped and why, and the unigram baseline: the cross-entropy (nats/token) of the val
tokens under the train split's token frequencies, the loss a model that ignores context
would reach. A language model is learning when its val loss goes well below it.

    dsv2 data prepare --tokenizer runs/tok --out runs/data                # stdlib sources
    dsv2 data prepare corpus/ more.jsonl --tokenizer runs/tok --out runs/data --val-fraction 0.01
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .corpus import Skipped, add_corpus_arguments, expand, iter_documents, select

SHARD_TOKENS = 1 << 24


class _SplitWriter:
    def __init__(self, out: Path, split: str, dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.n_buf = 0
        self.shards: list[dict] = []
        self.documents = 0
        self.counts: np.ndarray | None = None

    def add(self, ids: list[int], vocab: int) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.buf.append(arr)
        self.n_buf += arr.size
        self.documents += 1
        c = np.bincount(arr, minlength=vocab)
        self.counts = c if self.counts is None else self.counts + c
        if self.n_buf >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.n_buf:
            return
        name = f"{self.split}_{len(self.shards):05d}.bin"
        np.concatenate(self.buf).tofile(self.out / name)
        self.shards.append({"file": name, "tokens": int(self.n_buf)})
        self.buf, self.n_buf = [], 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.n_buf


def prepare_shards(paths, tokenizer_dir: str | Path, out_dir: str | Path, val_fraction: float = 0.01,
                   max_mb: float | None = None, shard_tokens: int = SHARD_TOKENS, verbose: bool = True) -> dict:
    """Tokenise `paths` (default corpus when empty) into `out_dir`; returns the card."""
    from tqdm import tqdm

    from ..tokenizer import Tokenizer
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"--val-fraction {val_fraction} must be between 0 and 0.5 (e.g. 0.01).")
    tok = Tokenizer(tokenizer_dir)
    if tok.bos_id is None or tok.eos_id is None:
        raise ValueError(f"the tokenizer at {tokenizer_dir} has no BOS/EOS token: train one with `dsv2 tokenizer train`.")
    vocab = tok.vocab_size
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("train_*.bin")) + list(out.glob("val_*.bin")):
        old.unlink()  # a re-run must not mix shards from an older corpus
    every = max(2, round(1 / val_fraction))
    writers = {s: _SplitWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    skipped = Skipped()
    t0 = time.time()
    n_files = len(select(expand(paths), None if max_mb is None else int(max_mb * 1e6)))
    docs = iter_documents(paths, skipped, None if max_mb is None else int(max_mb * 1e6))
    bar = tqdm(total=n_files, unit="doc", desc="tokenising", disable=not verbose, mininterval=1.0)
    i = 0
    while True:
        batch = [d for _, d in zip(range(64), docs)]
        if not batch:
            break
        for enc in tok.tk.encode_batch(batch, add_special_tokens=False):
            split = "val" if i % every == every // 2 else "train"
            writers[split].add([tok.bos_id] + enc.ids + [tok.eos_id], vocab)
            i += 1
        bar.update(len(batch))
    bar.close()
    for w in writers.values():
        w.flush()
    if not writers["train"].tokens or not writers["val"].tokens:
        raise ValueError(f"the corpus gave {i} document(s), too few for a train and a val split: "
                         "add documents or raise --val-fraction.")
    card = {
        "documents": {s: w.documents for s, w in writers.items()},
        "tokens": {s: w.tokens for s, w in writers.items()},
        "vocab_size": vocab, "dtype": np.dtype(dtype).name,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "tokenizer": str(Path(tokenizer_dir).resolve()),
        "shards": {s: w.shards for s, w in writers.items()},
        "unigram_val_loss": unigram_loss(writers["train"].counts, writers["val"].counts),
        "skipped": [{"path": p, "why": why} for p, why in skipped.items],
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    if verbose:
        if skipped.items:
            print(skipped.report())
        print(f"data: {card['documents']['train']:,} + {card['documents']['val']:,} documents, "
              f"{card['tokens']['train']:,} train + {card['tokens']['val']:,} val tokens in {time.time() - t0:.1f}s; "
              f"unigram val loss {card['unigram_val_loss']:.3f} nats -> {out}/card.json")
    return card


def unigram_loss(train_counts: np.ndarray, val_counts: np.ndarray) -> float:
    """Cross-entropy (nats) of val tokens under add-one-smoothed train unigram frequencies."""
    p = (train_counts.astype(np.float64) + 1.0) / (train_counts.sum() + train_counts.size)
    return float(-(val_counts * np.log(p)).sum() / val_counts.sum())


def read_card(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "card.json"
    if not path.exists():
        raise FileNotFoundError(f"no card.json in {data_dir}: run `dsv2 data prepare --out {data_dir}` first.")
    return json.loads(path.read_text())


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="tokenise a corpus into token shards",
                       description="Data tools. `dsv2 data prepare` tokenises a corpus into memory-mapped shards.")
    verbs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = verbs.add_parser("prepare", help="tokenise a corpus into train/val shards + card.json",
                         description="Tokenise text files, folders or .jsonl files (default: this Python's "
                                     "standard library sources) into uint16/uint32 shards and a card.json.")
    add_corpus_arguments(t)
    t.add_argument("--tokenizer", required=True, help="directory holding tokenizer.json")
    t.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (default 0.01)")
    t.set_defaults(func=lambda a: bool(prepare_shards(a.paths, a.tokenizer, a.out, a.val_fraction, a.max_mb)) and 0)


