"""Hugging Face checkpoints: load a DeepSeek-V2 directory into dsv2, and save one back.

A Hugging Face directory is config.json plus one `model.safetensors` or several shards
listed in `model.safetensors.index.json`. Released DeepSeek-V2 checkpoints store each
routed expert as three matrices (`experts.{e}.gate_proj/up_proj/down_proj`); dsv2 stacks
them into `[E, ...]` tensors (`gate_up_proj`, `down_proj`). transformers >= 5 may also
write the stacked form; both load.

Loading builds the model on the meta device, allocates it once in the target dtype, then
fills it tensor by tensor from each shard, so no second full copy is ever held.

`HF_KEYS` below is the only place HF key names appear.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .dtypes import parse_dtype
from .model import DeepseekV2


class CheckpointError(ValueError):
    """A checkpoint file or tensor is missing, unexpected or mis-shaped."""


# HF key pattern -> (dsv2 parameter, which part of it). Parts: None = the whole tensor;
# ("gate"|"up"|"down", expert) = one expert's matrix inside the stacked tensor.
HF_KEYS: list[tuple[re.Pattern, str, str | None]] = [
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.gate_proj\.weight$"), "layers.{0}.mlp.experts.gate_up_proj", "gate"),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.up_proj\.weight$"), "layers.{0}.mlp.experts.gate_up_proj", "up"),
    (re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.down_proj\.weight$"), "layers.{0}.mlp.experts.down_proj", "down"),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight", None),
    # Everything else is the same name under the `model.` prefix: embed_tokens, norm,
    # layers.{i}.{input,post_attention}_layernorm, self_attn.{q_proj, q_a_proj, q_a_layernorm,
    # q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}, mlp.{gate, shared_experts,
    # gate_proj, up_proj, down_proj}, and transformers 5's stacked mlp.experts.{gate_up_proj, down_proj}.
    (re.compile(r"^model\.(.+)$"), "{0}", None),
]
# Old remote-code checkpoints may carry rotary buffers; dsv2 recomputes them.
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def hf_to_dsv2(key: str) -> tuple[str, str | None, int | None]:
    """HF key -> (dsv2 name, part, expert index); raises for an unknown key."""
    for pattern, target, part in HF_KEYS:
        m = pattern.match(key)
        if m:
            g = m.groups()
            return target.format(*g), part, (int(g[1]) if part else None)
    raise CheckpointError(f"unexpected tensor '{key}' in the checkpoint: it is not a DeepSeek-V2 weight.")


def dsv2_to_hf(name: str, tensor: torch.Tensor, scale: torch.Tensor | None = None):
    """dsv2 state-dict entry (and, for float8, its block scales) -> iterator of (HF key, tensor)
    in the released checkpoints' layout; a float8 weight's scales follow it as `weight_scale_inv`."""
    m = re.match(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", name)
    if m:
        layer = m.group(1)
        for e in range(tensor.shape[0]):
            prefix = f"model.layers.{layer}.mlp.experts.{e}"
            if m.group(2) == "down_proj":
                parts = [("down_proj", tensor[e], None if scale is None else scale[e])]
            else:
                half = tensor.shape[1] // 2
                nb = None if scale is None else scale.shape[1] // 2
                parts = [("gate_proj", tensor[e, :half], None if scale is None else scale[e, :nb]),
                         ("up_proj", tensor[e, half:], None if scale is None else scale[e, nb:])]
            for proj, w, sc in parts:
                yield f"{prefix}.{proj}.weight", w
                if sc is not None:
                    yield f"{prefix}.{proj}.weight_scale_inv", sc
        return
    key = name if name == "lm_head.weight" else f"model.{name}"
    yield key, tensor
    if scale is not None:
        yield f"{key}_scale_inv", scale


# ----------------------------------------------------------------------------- load
def _shard_files(path: Path) -> list[Path]:
    """The weight files, chosen as transformers does: the index, else `model.safetensors`.

    Other `*.safetensors` beside them (an adapter, a reference copy) are not weights of this
    model and are left alone."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise CheckpointError(f"checkpoint shard {f} is listed in model.safetensors.index.json but missing.")
        if not files:
            raise CheckpointError(f"{index} lists no weight files (its weight_map is empty).")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    present = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    raise CheckpointError(f"{path} has neither model.safetensors.index.json nor model.safetensors, the files a "
                          f"Hugging Face checkpoint keeps its weights in; it holds: {', '.join(present) or 'nothing'}.")


def _checkpoint_dtype(path: Path) -> torch.dtype:
    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return getattr(torch, name, torch.float32)


def fp8_block_size(path: Path) -> tuple[int, int] | None:
    """The checkpoint's float8 block size from config.json's quantization_config (None: not
    quantized); any other quantization is refused with a sentence saying so."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None   # load_pretrained says what is missing
    q = json.loads(config.read_text()).get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise CheckpointError(f"config.json's quantization_config has quant_method {method!r}; dsv2 loads "
                              "float checkpoints and DeepSeek's block-scaled fp8 ones (quant_method \"fp8\").")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"config.json's quantization_config has fmt {q.get('fmt')!r}; dsv2 reads float8 e4m3.")
    block = q.get("weight_block_size", [128, 128])
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"config.json's quantization_config has weight_block_size {block!r}; "
                              "give two positive ints, e.g. [128, 128].")
    return tuple(block)


def empty_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                quantize: str | None = None, config: ModelConfig | None = None) -> tuple[DeepseekV2, torch.dtype]:
    """The model a checkpoint loads into, on the meta device (no memory), already quantized as
    asked; and its float dtype. What load_pretrained fills, and what the memory pre-flight counts."""
    from .quant import check_quantize, fp8, int8
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist.")
    if dtype == "fp8":
        dtype, quantize = None, "fp8"
    check_quantize(quantize)
    cfg = config if config is not None else ModelConfig.from_json(path)
    block = fp8_block_size(path)
    dtype = parse_dtype(dtype) or _checkpoint_dtype(path)
    with torch.device("meta"):
        model = DeepseekV2(cfg).to(dtype)
        if quantize == "fp8":
            fp8.to_fp8(model, block or fp8.BLOCK)
        elif quantize == "int8":
            int8.quantize_int8(model)
    return model, dtype


def checkpoint_tensors(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """HF key -> (safetensors dtype, shape, bytes) of every tensor, from the shard headers alone."""
    out = {}
    for file in _shard_files(Path(path)):
        with _Shard(file) as f:
            for key, h in f.header.items():
                out[key] = (h["dtype"], tuple(h["shape"]), h["data_offsets"][1] - h["data_offsets"][0])
    return out


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: str | torch.device = "cpu", heads: dict[str, torch.Tensor] | None = None,
                    quantize: str | None = None, config: ModelConfig | None = None) -> DeepseekV2:
    """Load a Hugging Face DeepSeek-V2 directory; returns the model in eval mode.

    dtype: the parameters' dtype (default: the checkpoint's own `torch_dtype`); "fp8" is short
    for quantize="fp8" with the checkpoint's dtype for the rest.
    quantize="fp8": the matrices quant/fp8.py lists stay float8 e4m3 with 128 x 128 block scales
    (an FP8 checkpoint's bytes as stored, a float one's quantized tensor by tensor). Without it an
    FP8 checkpoint is widened to `dtype` tensor by tensor (exactly its dequantized values).
    quantize="int8": int8 rows with a scale each (quant/int8.py), rounded as each tensor is read.
    Either way the float model is never held whole: peak memory is the quantized model plus one
    checkpoint tensor (what lets DeepSeek-V2-Lite's 31 GB of bf16 load in 24 GB).
    heads: further tensors to fill by their HF key, e.g. {"score.weight": w} for a
    DeepseekV2ForSequenceClassification checkpoint (a reward model), which has no lm_head.
    config: the model's config instead of config.json's, for one that changes no weight's shape
    (a context extension's rope_scaling; every tensor's shape is still checked).
    """
    from .quant import fp8, int8
    heads = heads or {}
    path = Path(path)
    model, dtype = empty_model(path, dtype, quantize, config)
    cfg, block = model.config, fp8_block_size(path)
    model = model.to_empty(device=device)
    block = block or fp8.BLOCK
    params = dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if b.dtype == fp8.FP8}
    buffers = dict(model.named_buffers())
    row_scales = {}   # int8 matrices, under the name of the float weight they stand for -> their row scales
    for prefix, m in model.named_modules():
        for weight, q, s in int8.quantized_weights(m):
            params[f"{prefix}.{weight}"], row_scales[f"{prefix}.{weight}"] = q, s
    # Track what has been filled; stacked experts are filled one expert-part at a time.
    expected: set[tuple[str, str | None, int | None]] = set()
    for name, p in params.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            expected |= {(name, part, e) for e in range(p.shape[0]) for part in ("gate", "up")}
        elif name.endswith(".mlp.experts.down_proj"):
            expected |= {(name, "down", e) for e in range(p.shape[0])}
        elif not (name == "lm_head.weight" and (cfg.tie_word_embeddings or "score.weight" in heads)):
            expected.add((name, None, None))
    filled: set[tuple] = set()
    files = _shard_files(path)
    scales = _ScaleReader(files)
    with torch.no_grad():
        for file in files:
            with _Shard(file) as f:
                for key in f.keys():
                    if _IGNORED.search(key) or key.endswith("weight_scale_inv"):
                        continue   # scales are read with their weights
                    if key in heads:
                        shape = f.shape(key)
                        if shape != tuple(heads[key].shape):
                            raise CheckpointError(f"tensor '{key}' in {file.name} has shape {list(shape)}, but this "
                                                  f"model needs {list(heads[key].shape)}: the file belongs to another model.")
                        heads[key].copy_(f.get_tensor(key))
                        filled.add((key, None, None))
                        continue
                    name, part, e = hf_to_dsv2(key)
                    if name not in params:
                        raise CheckpointError(f"unexpected tensor '{key}' in {file.name}: this config has no '{name}'.")
                    target = _target_view(params[name], part, e)
                    shape = f.shape(key)
                    if shape != tuple(target.shape):
                        raise CheckpointError(f"tensor '{key}' in {file.name} has shape {list(shape)}, but the config "
                                              f"expects {list(target.shape)}: config.json and the weights disagree.")
                    t = f.get_tensor(key)
                    if t.dtype == fp8.FP8 and part is None and ".mlp.experts." in name:
                        raise CheckpointError(f"tensor '{key}' holds every expert's float8 matrices in one; dsv2 reads "
                                              "float8 experts stored one per expert (experts.{e}.gate_proj.weight ...).")
                    scale = scales.get(key, t, block) if t.dtype == fp8.FP8 else None
                    if target.dtype == fp8.FP8:
                        _fill_fp8(target, _target_view(buffers[f"{name}_scale_inv"], part, e), t, scale, block,
                                  split=target.shape[-2] // 2 if part is None and name.endswith("gate_up_proj") else None)
                    elif target.dtype == torch.int8:
                        w = t.to(dtype) if scale is None else fp8.dequantize_blocks(t, scale, block, dtype)
                        q, s = int8.quantize_rows(w)
                        target.copy_(q)
                        _target_view(row_scales[name], part, e).copy_(s)
                    elif scale is not None:
                        target.copy_(fp8.dequantize_blocks(t, scale, block, target.dtype))
                    else:
                        target.copy_(t)
                    if part is None and ".mlp.experts." in name:  # stacked (transformers 5) layout
                        parts = ("down",) if name.endswith("down_proj") else ("gate", "up")
                        filled |= {(name, pt, i) for i in range(target.shape[0]) for pt in parts}
                    else:
                        filled.add((name, part, e))
    for key in heads:
        if (key, None, None) not in filled:
            raise CheckpointError(f"tensor '{key}' is missing from the checkpoint in {path}: it is not the kind "
                                  "of checkpoint asked for (a reward model has score.weight).")
    if "score.weight" in heads and ("lm_head.weight", None, None) not in filled and not cfg.tie_word_embeddings:
        model.lm_head.weight.data.zero_()   # a classifier has no LM head; never leave memory uninitialised
    missing = sorted(expected - filled, key=str)
    if missing:
        name, part, e = missing[0]
        hf = next(k for k, _ in dsv2_to_hf(name, params[name])) if part is None else \
            f"model.layers.{name.split('.')[1]}.mlp.experts.{e}.{part}_proj.weight"
        raise CheckpointError(f"tensor '{hf}' is missing from the checkpoint in {path} "
                              f"({len(missing)} missing in all).")
    model.rotary.inv_freq.copy_(type(model.rotary)(cfg).inv_freq.to(device))
    return model.eval()


# safetensors' dtype names -> torch dtypes (what _Shard reads; bench/make_checkpoint writes the inverse)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8,
                      "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                      "BOOL": torch.bool}


class _Shard:
    """One safetensors file, each tensor read into its own memory with a plain read.

    safetensors' safe_open maps the file instead, and every page a read touches stays in this
    process's resident set until the file is closed: loading a 5 GB shard would add 5 GB to the
    peak, which decides whether a 31 GB checkpoint can be stream-quantized in 24 GB. The format
    is an 8-byte header length, a JSON header of dtype / shape / data_offsets, then the bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "rb")
        try:
            n = struct.unpack("<Q", self.f.read(8))[0]
            self.header = json.loads(self.f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            self.f.close()
            raise CheckpointError(f"{path} is not a safetensors file (its header does not parse: {e}).") from None
        self.header.pop("__metadata__", None)
        self.base = 8 + n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def get_tensor(self, key: str) -> torch.Tensor:
        h = self.header[key]
        if h["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor '{key}' in {self.path.name} has dtype {h['dtype']}, which dsv2 does not read.")
        t = torch.empty(h["shape"], dtype=SAFETENSORS_DTYPES[h["dtype"]])
        begin, end = h["data_offsets"]
        nbytes = t.numel() * t.element_size()
        if end - begin != nbytes:
            raise CheckpointError(f"tensor '{key}' in {self.path.name} spans {end - begin} bytes but its shape "
                                  f"{h['shape']} in {h['dtype']} needs {nbytes}: the file is corrupt.")
        if nbytes:
            self.f.seek(self.base + begin)
            if self.f.readinto(t.view(-1).view(torch.uint8).numpy()) != nbytes:
                raise CheckpointError(f"{self.path} ends inside tensor '{key}': the file is truncated "
                                      "(an interrupted download?).")
        return t


class _ScaleReader:
    """A float8 weight's `weight_scale_inv`, from whichever shard holds it, checked against the weight."""

    def __init__(self, files: list[Path]):
        self.scales: dict[str, torch.Tensor] = {}   # all of them: 1/16384 of the weights' elements
        for file in files:
            with _Shard(file) as f:
                self.scales.update({k: f.get_tensor(k) for k in f.keys() if k.endswith("weight_scale_inv")})

    def get(self, key: str, weight: torch.Tensor, block) -> torch.Tensor:
        from .quant.fp8 import scale_shape
        skey = f"{key}_scale_inv"
        if skey not in self.scales:
            raise CheckpointError(f"tensor '{key}' is float8 but its block scales '{skey}' are missing from the "
                                  "checkpoint: an FP8 checkpoint stores one beside every float8 weight.")
        s = self.scales[skey]
        want = scale_shape(tuple(weight.shape), block)
        if tuple(s.shape) != want or not s.is_floating_point():
            raise CheckpointError(f"tensor '{skey}' has shape {list(s.shape)} ({s.dtype}), but a float8 weight of "
                                  f"{list(weight.shape)} in {block[0]}x{block[1]} blocks needs {list(want)} floats.")
        return s.float()


def _fill_fp8(q_out: torch.Tensor, s_out: torch.Tensor, t: torch.Tensor, scale: torch.Tensor | None, block,
              split: int | None = None) -> None:
    """Fill a float8 target (and its scales) from a checkpoint tensor: float8 as stored, a float quantized."""
    from .quant import fp8
    if scale is None:
        t, scale = fp8.quantize_stacked(t, split, block) if split else fp8.quantize_blocks(t, block)
    q_out.copy_(t)
    s_out.copy_(scale)


def _target_view(p: torch.Tensor, part: str | None, e: int | None) -> torch.Tensor:
    """One expert's part of a stacked tensor (or its float8 block scales: gate blocks, then up blocks)."""
    if part is None:
        return p
    if part == "down":
        return p[e]
    half = p.shape[1] // 2
    return p[e, :half] if part == "gate" else p[e, half:]


# ----------------------------------------------------------------------------- save
def save_pretrained(model: DeepseekV2, path: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                    max_shard_bytes: int = 5 * 2**30, heads: dict[str, torch.Tensor] | None = None,
                    config_extra: dict | None = None, fp8: bool = False) -> None:
    """Write config.json, generation_config.json and safetensors shards that transformers loads.

    Order matters for a folder that already holds a checkpoint: every new file is written
    under a temporary name first, then renamed into place (shards before the index and
    config that point at them), and only then are stale shards of the old layout deleted.
    A crash while writing leaves the old checkpoint loadable; never a folder without weights.

    heads: tensors written under their own HF keys instead of lm_head (a reward model's
    score.weight); config_extra: keys added to config.json (its architectures, num_labels).
    fp8: write DeepSeek's FP8 format (quant/fp8.py: e4m3 matrices with 128 x 128 block scales and
    a quantization_config); without it a model loaded in fp8 is written widened to float.
    """
    from .quant.fp8 import BLOCK, QUANT_CONFIG, float_weights
    _refuse_decode_only(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    block = getattr(model, "fp8_block", None) or BLOCK
    state = {}
    for name, t, scale in float_weights(model, fp8, block):
        if name == "lm_head.weight" and (cfg.tie_word_embeddings or heads):
            continue
        for key, v in dsv2_to_hf(name, t, scale):
            state[key] = v.detach().to("cpu").contiguous()
    if fp8:
        config_extra = {"quantization_config": QUANT_CONFIG | {"weight_block_size": list(block)}} | (config_extra or {})
    for key, v in (heads or {}).items():
        state[key] = v.detach().to("cpu").contiguous()
    shards = _split(state, max_shard_bytes)
    dtype = next(t.dtype for t in model.state_dict().values() if t.is_floating_point() and t.dtype != torch.float8_e4m3fn)
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
    files: dict[str, object] = {}       # final name -> writer(tmp_path), in the order they are swapped in
    if len(shards) == 1:
        files["model.safetensors"] = lambda p: save_file(shards[0], p, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            files[fname] = lambda p, s=shard: save_file(s, p, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        files["model.safetensors.index.json"] = _json_writer({"metadata": {"total_size": total},
                                                              "weight_map": weight_map})
    files["config.json"] = _json_writer(cfg.to_hf_dict() | {"torch_dtype": str(dtype).split(".")[-1]}
                                        | (config_extra or {}))
    files["generation_config.json"] = _json_writer(gen)
    if tokenizer_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = Path(tokenizer_dir) / name
            if src.exists() and src.resolve() != (path / name).resolve():
                files[name] = lambda p, s=src: shutil.copyfile(s, p)
    staged = _stage(path, files)
    try:
        _swap(staged)
    finally:                            # an interrupted swap leaves no temporary file behind
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
    _delete_stale(path, keep=set(files))


def _refuse_decode_only(model) -> None:
    """Matrices quantized for decoding (int8 rows + scales) are not a checkpoint transformers reads
    (float8 ones are written as DeepSeek's FP8 format, or widened)."""
    quantized = next((str(t.dtype).split(".")[-1] for t in model.state_dict().values() if not t.is_floating_point()),
                     None)
    if quantized:
        raise ValueError(f"this model's matrices are {quantized} for decoding and cannot be saved as a "
                         "checkpoint; save the float model it was quantized from.")


def _split(state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    return shards


def _stage(path: Path, files: dict) -> list[tuple[str, Path]]:
    """Write every file under a temporary name in `path`; on any failure remove them all."""
    staged: list[tuple[str, Path]] = []
    try:
        for name, write in files.items():
            fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            staged.append((tmp, path / name))
            write(tmp)
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    return staged


def _swap(staged: list[tuple[str, Path]]) -> None:
    for tmp, dest in staged:
        os.replace(tmp, dest)


def _delete_stale(path: Path, keep: set[str]) -> None:
    """Weights of the previous layout that the new one does not use: the index first, so the
    folder never points at deleted shards."""
    stale = [p for p in path.glob("model.safetensors.index.json") if p.name not in keep]
    stale += [p for p in path.glob("model*.safetensors") if p.name not in keep]
    for p in stale:
        p.unlink(missing_ok=True)


def _json_writer(obj):
    return lambda p: Path(p).write_text(json.dumps(obj, indent=2) + "\n")


__all__ = ["load_pretrained", "save_pretrained", "CheckpointError", "ConfigError", "HF_KEYS"]
