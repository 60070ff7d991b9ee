"""`dsv2 tokenizer train`: a byte-level BPE tokenizer, written as DeepSeek-V2 ships its own.

Byte-level means every byte has a token, so any text encodes without unknown tokens and
decodes back exactly. The output directory holds `tokenizer.json` and
`tokenizer_config.json` (BOS/EOS as DeepSeek-V2 names them, ids 0 and 1 to match the
presets' `bos_token_id` / `eos_token_id`, and the DeepSeek chat template), which
`dsv2.Tokenizer`, `dsv2 generate` and transformers' `AutoTokenizer` all load.

    dsv2 tokenizer train --out runs/tok --vocab-size 4096          # this Python's stdlib sources
    dsv2 tokenizer train corpus/ extra.jsonl --out runs/tok --vocab-size 8192
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..tokenizer import DEEPSEEK_CHAT_TEMPLATE
from .corpus import Skipped, add_corpus_arguments, iter_documents

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


def byte_level_bpe(texts: list[str], vocab_size: int, special_tokens=(BOS, EOS)):
    """A byte-level BPE (tokenizers.Tokenizer) trained on `texts`; the special tokens get ids 0, 1, ..."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer, length=len(texts))
    return tk


def write_tokenizer_config(out: Path, model_max_length: int = 16384) -> None:
    """tokenizer_config.json as DeepSeek-V2 ships it: BOS/EOS names, BOS first, the chat template."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
        "chat_template": DEEPSEEK_CHAT_TEMPLATE,
    }
    (Path(out) / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def train_tokenizer(paths, out_dir: str | Path, vocab_size: int = 4096, max_mb: float | None = None,
                    verbose: bool = True) -> Path:
    """Train on the documents under `paths` (default corpus when empty); returns `out_dir`."""
    if vocab_size < 256 + 2:
        raise ValueError(f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least 258 "
                         "(256 bytes + BOS + EOS).")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped = Skipped()
    t0 = time.time()
    docs = list(iter_documents(paths, skipped, None if max_mb is None else int(max_mb * 1e6)))
    if not docs:
        raise ValueError("the corpus has no readable UTF-8 documents: give text files, folders or .jsonl files.")
    if verbose:
        print(f"tokenizer: {len(docs):,} documents, {sum(map(len, docs)) / 1e6:.1f}M characters")
        if skipped.items:
            print(skipped.report())
    tk = byte_level_bpe(docs, vocab_size)
    tk.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out)
    if verbose:
        print(f"tokenizer: {tk.get_vocab_size():,} tokens in {time.time() - t0:.1f}s -> {out}/tokenizer.json")
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer",
                       description="Tokenizer tools. `dsv2 tokenizer train` trains a byte-level BPE.")
    verbs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = verbs.add_parser("train", help="train a byte-level BPE on a corpus",
                         description="Train a byte-level BPE and write tokenizer.json + tokenizer_config.json. "
                                     "With no paths the corpus is this Python's standard library sources.")
    add_corpus_arguments(t)
    t.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size incl. BOS/EOS (default 4096)")
    t.set_defaults(func=lambda a: bool(train_tokenizer(a.paths, a.out, a.vocab_size, a.max_mb)) and 0)
