"""Data for pretraining: corpus -> byte-level BPE tokenizer -> memory-mapped token shards -> loader.

    corpus.py     documents from text files, folders and JSONL (default: this Python's stdlib sources)
    bpe.py        `dsv2 tokenizer train`: a byte-level BPE with DeepSeek's BOS/EOS and chat template
    shards.py     `dsv2 data prepare`: token shards (.bin, uint16/uint32) + card.json
    loader.py     fixed-length windows in a seeded order, with an exact, saveable position
"""

from .corpus import default_corpus, iter_documents
from .loader import TokenLoader
from .shards import prepare_shards

__all__ = ["default_corpus", "iter_documents", "TokenLoader", "prepare_shards"]
