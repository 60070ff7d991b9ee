"""Sliding-window perplexity and bits per byte (`dsv2 eval perplexity`).

    dsv2 eval perplexity runs/demo/pretrain/hf --text held_out.py --max-len 256 --stride 128
    dsv2 eval perplexity MODEL --text a.txt b.txt --json               # last stdout line: one JSON object
    dsv2 eval perplexity MODEL --text long.txt --lengths 256,512,1024  # perplexity against context length
    dsv2 eval perplexity MODEL --text a.txt --quantize fp8 --kv-cache-dtype mixed   # a deployment's formats

A document is its tokens s (with BOS first when the tokenizer config's add_bos_token says so).
Every token but s[0] is scored once. Windows of at most max_len input tokens start every
`stride` tokens: window k reads s[k*stride : k*stride + max_len] and scores only the targets
no earlier window scored, so each scored token has between max_len - stride and max_len - 1
tokens of context. The last window is moved back to end at the document's end with a full
max_len of input, giving its few new targets as much context as the others. At stride =
max_len this is lm-evaluation-harness's `loglikelihood_rolling`, and the same windows serve
both (eval/harness.py).

bits_per_byte = nll / (ln 2 x UTF-8 bytes of the text): unlike perplexity it does not depend
on the tokenizer, which is why the paper reports Pile-test in BPB (section 3.2.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE = -100


def windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a document of n tokens -> [(begin, end, first)]: inputs s[begin:end], targets
    s[begin+1:end+1], of which those at indices first..end are scored (every index 1..n-1 once)."""
    if max_len < 1 or not 1 <= stride <= max_len:
        raise ValueError(f"need max_len >= 1 and 1 <= stride <= max_len, got max_len={max_len}, stride={stride}.")
    out, scored, k = [], 0, 0
    while scored < n - 1:
        begin = k * stride
        end = begin + max_len
        if end >= n - 1:
            end = n - 1
            begin = max(0, end - max_len)
        out.append((begin, end, scored + 1))
        scored, k = end, k + 1
    return out


@torch.inference_mode()
def score_windows(model, ids: list[int], max_len: int, stride: int, batch: int = 8,
                  scored_from: int = 1, kv_cache_dtype: str | None = None) -> tuple[float, int]:
    """(summed nll in nats, tokens scored) of one document's tokens under `model`, through the
    sliding windows above; with scored_from, targets before that index are not scored. With
    kv_cache_dtype (engine/cache.py) each window is prefilled into a latent cache of that format
    and attends to the rows as stored, so the score includes the cache's rounding."""
    device = next(model.parameters()).device
    jobs = []
    for begin, end, first in windows(len(ids), max_len, stride):
        first = max(first, scored_from)
        if first > end:
            continue
        x = ids[begin:end]
        y = [IGNORE if begin + 1 + i < first else t for i, t in enumerate(ids[begin + 1: end + 1])]
        jobs.append((x, y))
    nll, n = 0.0, 0
    for i in range(0, len(jobs), batch):   # windows are max_len long but for a short document's one
        part = jobs[i: i + batch]
        for length in sorted({len(x) for x, _ in part}):
            same = [(x, y) for x, y in part if len(x) == length]
            x = torch.tensor([x for x, _ in same], device=device)
            y = torch.tensor([y for _, y in same], device=device)
            nll += float(model(x, targets=y, **through_cache(model, x, kv_cache_dtype)))
            n += int((y != IGNORE).sum())
    return nll, n


def through_cache(model, x: torch.Tensor, kv_cache_dtype: str | None) -> dict:
    """forward() arguments that prefill x [B, T] into a fresh cache of that format (none: {})."""
    if kv_cache_dtype in (None, "auto"):
        return {}
    from ..engine.cache import LatentCache
    from ..model.attention import KVStep
    B, T = x.shape
    cache = LatentCache(model.config, B, T, next(model.parameters()).dtype, x.device, kv_cache_dtype)
    return {"kv": cache.layers(), "step": KVStep(torch.arange(T, device=x.device)[None].expand(B, T), T, None)}


@dataclass
class Document:
    name: str
    text: str
    ids: list[int]

    @property
    def bytes(self) -> int:
        return len(self.text.encode("utf-8"))


def read_documents(paths, tokenizer) -> list[Document]:
    """One document per file, tokenized as the tokenizer config says (BOS or not)."""
    if not paths:
        raise ValueError("no text to score: pass --text FILE [FILE ...].")
    docs = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"no text file at {p}: --text takes paths of UTF-8 text files.")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
        if not text.strip():
            raise ValueError(f"{p} is empty: give a file with text to score.")
        ids = tokenizer.encode(text)
        if len(ids) < 2:
            raise ValueError(f"{p} holds {len(ids)} tokens: a document needs at "
                             "least two (one to condition on, one to score).")
        docs.append(Document(str(p), text, ids))
    return docs


def default_window(model) -> int:
    """Tokens a window reads unless told: the model's context, at most 2048."""
    return min(model.config.max_position_embeddings, 2048)


def check_window(model, max_len: int) -> None:
    ctx = model.config.max_position_embeddings
    if max_len > ctx:
        raise ValueError(f"--max-len {max_len} is over the model's context of {ctx} tokens "
                         "(max_position_embeddings); use at most that.")


def perplexity(model, docs: list[Document], max_len: int, stride: int | None = None, batch: int = 8,
               progress: bool = False, kv_cache_dtype: str | None = None) -> dict:
    """-> {tokens, nll, ppl, bits_per_byte, bytes} summed over the documents."""
    check_window(model, max_len)
    stride = max_len if stride is None else stride
    nll, n = 0.0, 0
    from tqdm import tqdm
    for doc in tqdm(docs, desc="perplexity", unit="doc", disable=not progress):
        d_nll, d_n = score_windows(model, doc.ids, max_len, stride, batch, kv_cache_dtype=kv_cache_dtype)
        nll, n = nll + d_nll, n + d_n
    nbytes = sum(d.bytes for d in docs)
    return {"tokens": n, "nll": nll, "ppl": math.exp(nll / n), "bits_per_byte": nll / (math.log(2) * nbytes),
            "bytes": nbytes}


def context_curve(model, docs: list[Document], lengths: list[int], tail: int, batch: int = 8,
                  progress: bool = False, kv_cache_dtype: str | None = None) -> list[dict]:
    """Perplexity of the same final `tail` tokens of each document, read with windows of each
    length in `lengths` (stride = tail, so every scored token has at least length - tail tokens
    of context). Documents shorter than max(lengths) + 1 tokens are left out (named in the rows)."""
    lengths = sorted(set(lengths))
    for L in lengths:
        check_window(model, L)
    if not 1 <= tail <= lengths[0]:
        raise ValueError(f"--tail {tail} must be between 1 and the shortest length {lengths[0]}.")
    used = [d for d in docs if len(d.ids) > lengths[-1]]
    if not used:
        raise ValueError(f"no document has more than {lengths[-1]} tokens (the longest --lengths); the longest has "
                         f"{max(len(d.ids) for d in docs)}: give longer texts or shorter lengths.")
    rows = []
    from tqdm import tqdm
    for L in tqdm(lengths, desc="context lengths", disable=not progress):
        nll, n = 0.0, 0
        for d in used:
            begin = len(d.ids) - 1 - L   # the document's last L + 1 tokens
            d_nll, d_n = score_windows(model, d.ids[begin:], L, tail, batch, scored_from=L + 1 - tail,
                                       kv_cache_dtype=kv_cache_dtype)
            nll, n = nll + d_nll, n + d_n
        rows.append({"max_len": L, "tokens": n, "nll": nll, "ppl": math.exp(nll / n),
                     "documents": len(used), "left_out": [d.name for d in docs if d not in used]})
    return rows


def plot_curve(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["max_len"] for r in rows], [r["ppl"] for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"perplexity of the final {rows[0]['tokens'] // max(1, rows[0]['documents'])} tokens")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
