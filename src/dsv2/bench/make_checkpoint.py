"""A random checkpoint at a preset's real size, laid out as DeepSeek releases theirs.

    .venv/bin/python bench/make_checkpoint.py deepseek-v2-lite /data/v2-lite        # 31 GB, ~3 min
    .venv/bin/python bench/make_checkpoint.py deepseek-v2 /tmp/v2-2l --layers 2     # real widths, 2 layers

What it writes, in OUT_DIR:
- `config.json` (the preset's, as transformers reads it; `--layers` cuts num_hidden_layers)
  and `generation_config.json`;
- bf16 shards `model-0000i-of-0000N.safetensors` with `model.safetensors.index.json`, one
  matrix per routed expert under the HF names (`mlp.experts.{e}.gate_proj.weight`, ...);
- `tokenizer.json` + `tokenizer_config.json`: a byte-level BPE trained on dsv2's own sources,
  padded with `<reserved_i>` entries so that BOS and EOS sit at the config's ids (100000 and
  100001 for DeepSeek-V2), with DeepSeek's chat template.

Weights are Normal(0, initializer_range) and norms 1, as `DeepseekV2.init_weights` sets them,
so activations stay finite at any depth. Each tensor draws from its own generator, seeded by
(seed, its HF key), so a shard's bytes depend only on the seed. Shards are streamed: the
safetensors header is written first (every shape is known from the config), then each tensor
as it is drawn, so memory stays at the largest single tensor (the 420 MB embedding for V2-Lite)
however large the checkpoint. Every file is written under a temporary name and renamed when
complete, index and config last.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

from ..checkpoint import SAFETENSORS_DTYPES
from .common import source_texts

_DTYPE_NAME = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}   # torch dtype -> safetensors name


def tensor_layout(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(HF key, shape) of every weight of `cfg`, in the order the released checkpoints store them."""
    from ..checkpoint import dsv2_to_hf
    from ..model import DeepseekV2
    with torch.device("meta"):
        model = DeepseekV2(cfg)
    out = []
    for name, p in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        out += [(key, tuple(t.shape)) for key, t in dsv2_to_hf(name, p)]
    return out


def _shards(layout, dtype: torch.dtype, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors, a new shard whenever the next one would pass shard_bytes."""
    shards, size = [[]], 0
    for key, shape in layout:
        n = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += n
    return shards


def _draw(key: str, shape, dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    if key.endswith("norm.weight"):              # every RMSNorm: input_, post_attention_, kv_a_, q_a_, final
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))   # the CPU generator keeps 32 bits
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)


def _write_shard(path: Path, tensors, dtype: torch.dtype, std: float, seed: int, progress) -> int:
    """Stream one safetensors file: header first, then each tensor as it is drawn; returns its bytes."""
    header, offset = {}, 0
    for key, shape in tensors:
        n = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": _DTYPE_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)               # the format pads the header to 8 bytes
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for key, shape in tensors:
            t = _draw(key, shape, dtype, std, seed)
            f.write(t.view(torch.uint8).numpy().data)
            progress(t.numel() * dtype.itemsize)
    os.replace(tmp, path)
    return offset


def write_tokenizer(out: Path, cfg, trained_vocab: int = 8192) -> int:
    """A byte-level BPE whose BOS/EOS ids are the config's; returns its size (<= cfg.vocab_size).

    DeepSeek-V2's own layout: 100,000 BPE entries, then BOS at 100000 and EOS at 100001, in a
    102,400-row embedding. Only `trained_vocab` entries are learned here (dsv2's sources are a few
    MB); the rest are `<reserved_i>` placeholders that no text encodes to."""
    from ..data.bpe import BOS, EOS, byte_level_bpe, write_tokenizer_config
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    size = max(bos, eos) + 1 if max(bos, eos) >= 256 + 2 else min(cfg.vocab_size, trained_vocab)
    if size > cfg.vocab_size:
        raise ValueError(f"bos/eos ids {bos}/{eos} lie outside the vocabulary of {cfg.vocab_size}.")
    spec = json.loads(byte_level_bpe(source_texts(), min(size - 2, trained_vocab), special_tokens=()).to_str())
    learned = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    free = [i for i in range(size) if i not in (bos, eos)]
    vocab = {tok: free[i] for i, tok in enumerate(learned)}
    vocab |= {f"<reserved_{i}>": free[i] for i in range(len(learned), len(free))}
    vocab |= {BOS: bos, EOS: eos}
    spec["model"]["vocab"] = vocab
    bos_piece = [{"SpecialToken": {"id": BOS, "type_id": 0}}]   # BOS before every text, as DeepSeek's does
    spec["post_processor"] = {"type": "TemplateProcessing", "single": bos_piece + [{"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": bos_piece + [{"Sequence": {"id": "A", "type_id": 0}}]
                              + bos_piece + [{"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {BOS: {"id": BOS, "ids": [bos], "tokens": [BOS]}}}
    spec["added_tokens"] = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for tok, i in ((BOS, bos), (EOS, eos))]
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    write_tokenizer_config(out, cfg.max_position_embeddings)
    return size


def write_checkpoint(preset: str, out: str | Path, layers: int | None = None, seed: int = 0,
                     shard_gb: float = 5.0, dtype: torch.dtype = torch.bfloat16, verbose: bool = True,
                     overrides: dict | None = None) -> Path:
    """Write `preset` (optionally cut to `layers` layers, or with other config fields overridden)
    as a random sharded HF checkpoint; returns `out`."""
    from ..config import ModelConfig
    depth = ModelConfig.from_preset(preset).num_hidden_layers
    if layers is not None and not 1 <= layers <= depth:
        raise ValueError(f"--layers {layers}: give 1 to {depth} (the preset's depth).")
    cfg = ModelConfig.from_preset(preset, **(overrides or {}) | ({"num_hidden_layers": layers} if layers else {}))
    if shard_gb <= 0:
        raise ValueError(f"--shard-gb {shard_gb}: give a positive size in GB.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layout = tensor_layout(cfg)
    shards = _shards(layout, dtype, int(shard_gb * 1e9))
    total = sum(torch.Size(s).numel() for _, s in layout) * dtype.itemsize
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for stale in out.glob("model*.safetensors"):  # another layout's shards would confuse a loader
        if stale.name not in names:
            stale.unlink()
    from tqdm import tqdm
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{preset} -> {out}", disable=not verbose)
    t0 = time.time()
    weight_map = {}
    for name, tensors in zip(names, shards):
        _write_shard(out / name, tensors, dtype, cfg.initializer_range, seed, bar.update)
        weight_map |= {key: name for key, _ in tensors}
    bar.close()
    vocab = write_tokenizer(out, cfg)
    files = {"model.safetensors.index.json": {"metadata": {"total_size": total}, "weight_map": weight_map},
             "generation_config.json": {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id},
             "config.json": cfg.to_hf_dict() | {"torch_dtype": str(dtype).split(".")[-1]}}
    for fname, obj in files.items():
        tmp = out / f".{fname}.tmp"
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, out / fname)
    if verbose:
        print(f"{out}: {len(layout):,} tensors, {total / 1e9:.2f} GB in {len(names)} shards, tokenizer of "
              f"{vocab:,} tokens, {time.time() - t0:.0f}s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help="a preset name (dsv2 info --list), e.g. deepseek-v2-lite")
    p.add_argument("out", help="output directory")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (tests, quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-gb", type=float, default=5.0, help="largest shard in GB (default 5, as transformers)")
    args = p.parse_args(argv)
    write_checkpoint(args.preset, args.out, args.layers, args.seed, args.shard_gb)
    return 0
