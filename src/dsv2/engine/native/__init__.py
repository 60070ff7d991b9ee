"""The fused CPU decode step (decode.c): every layer of one decode step in a single C call.

On a CPU, decoding a few tokens is bound by per-op dispatch and by the bytes of weights
read, not by arithmetic: the eager step issues ~3,500 aten calls for the `small` preset.
decode.c runs the same math (absorbed MLA over the latent cache, DeepSeekMoE with greedy or
group-limited routing) with float32 activations, reading float32, bfloat16 or int8
(`quantize_int8`) weights straight from the model's tensors, so nothing is copied.

It is compiled on first use with the system C compiler (`cc -O3 -march=native -fopenmp`)
into ~/.cache/dsv2 (or $DSV2_CACHE_DIR), keyed by the source, the compiler and this CPU's
flags, and written atomically. It links the OpenMP runtime torch already loaded, so the
two share one thread pool. Without a compiler the engine decodes with PyTorch ops and says
so once on stderr; DSV2_NATIVE=0 turns the fused step off.

    dec = NativeDecoder(model)            # raises Unsupported (with the reason) if it cannot run
    logits_BV = dec(tokens_B1, positions, kv_len, cache)   # float32 [B, vocab]
"""

from __future__ import annotations

import ctypes as C
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
F32, BF16, I8 = 0, 1, 2


class Unsupported(RuntimeError):
    """This model, device or machine cannot use the fused decode step."""


class Mat(C.Structure):
    _fields_ = [("w", C.c_void_p), ("scale", C.c_void_p), ("stride", C.c_int64),
                ("type", C.c_int32), ("rows", C.c_int32), ("cols", C.c_int32)]


class Layer(C.Structure):
    _fields_ = [("in_norm", C.c_void_p), ("post_norm", C.c_void_p), ("q_a_norm", C.c_void_p),
                ("kv_a_norm", C.c_void_p), ("q_a", Mat), ("q_b", Mat), ("kv_a", Mat), ("kv_b", Mat),
                ("o", Mat), ("w_ukt", Mat), ("moe", C.c_int32), ("gate", Mat), ("up", Mat), ("down", Mat),
                ("router", C.c_void_p), ("gu", Mat), ("dn", Mat)]


class Model(C.Structure):
    _fields_ = [(n, C.c_int32) for n in ("n_layers", "D", "H", "N", "R", "V", "C", "QR", "I_moe", "E", "K",
                                          "n_group", "topk_group", "group_limited", "norm_topk", "vocab")] + \
               [(n, C.c_float) for n in ("eps", "scale", "routed_scaling", "rope_amp")] + \
               [("inv_freq", C.c_void_p), ("embed", Mat), ("head", Mat), ("final_norm", C.c_void_p),
                ("layers", C.c_void_p), ("cache_type", C.c_int32), ("max_cols", C.c_int32),
                ("I_max", C.c_int32)]


_lib = None
_lib_error: str | None = None
_noticed = False


def _cache_dir() -> Path:
    if os.environ.get("DSV2_CACHE_DIR"):
        return Path(os.environ["DSV2_CACHE_DIR"])
    try:
        return Path.home() / ".cache" / "dsv2"
    except RuntimeError:   # no home directory (some service accounts)
        return Path(tempfile.gettempdir()) / "dsv2-cache"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def library():
    """The compiled decode.c (built once per source, compiler and CPU). Raises Unsupported, the
    same reason every time, when it cannot be built or loaded here."""
    global _lib, _lib_error
    if _lib is None and _lib_error is None:
        try:
            _lib = _compile_and_load()
        except Unsupported as e:
            _lib_error = str(e)
        except (OSError, subprocess.SubprocessError) as e:   # no such compiler, unwritable cache, bad .so
            _lib_error = f"the fused decode step could not be built or loaded ({type(e).__name__}: {e})"
    if _lib is None:
        raise Unsupported(_lib_error)
    return _lib


def _compile_and_load():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unsupported("no C compiler found (install gcc, or set CC)")
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(FLAGS).encode(), _cpu_flags().encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"decode-{key}.so"
    if not out.exists():
        print(f"dsv2: building the fused CPU decode step with {cc} (once per machine, a few seconds)...",
              file=sys.stderr, flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            part = Path(tmp) / out.name
            r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(part), "-lm"],
                               capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                lines = (r.stderr or r.stdout).strip().splitlines()
                first = next((line for line in lines if "error" in line), lines[0] if lines else "no output")
                raise Unsupported(f"{cc} could not build the fused decode step: {first.strip()}")
            os.replace(part, out)   # atomic: a concurrent build sees the old file or the new one
    lib = C.CDLL(str(out))
    lib.dsv2_work_floats.restype = C.c_int64
    lib.dsv2_work_floats.argtypes = [C.POINTER(Model), C.c_int, C.c_int, C.c_int]
    lib.dsv2_decode.restype = C.c_int
    lib.dsv2_decode.argtypes = [C.POINTER(Model), C.c_int, C.c_void_p, C.c_void_p, C.c_int, C.c_void_p,
                                C.c_int64, C.c_void_p, C.c_void_p, C.c_int]
    return lib


def why_unavailable() -> str:
    """Why the fused step cannot be used here ("" when it can)."""
    if os.environ.get("DSV2_NATIVE", "1") == "0":
        return "DSV2_NATIVE=0 is set"
    try:
        library()
    except Unsupported as e:
        return str(e)
    return ""


def available(notice: bool = True) -> bool:
    """Whether the fused step can be used here; when it cannot be built, says why once on stderr."""
    global _noticed
    why = why_unavailable()
    if why and why == _lib_error and notice and not _noticed:   # a build failure, not a switch
        _noticed = True
        print(f"dsv2: fused CPU decode step unavailable ({why}); decoding with PyTorch ops.", file=sys.stderr)
    return not why


_TYPES = {torch.float32: F32, torch.bfloat16: BF16}


class NativeDecoder:
    """The model's weights described to decode.c: pointers into its own tensors, so in-place updates
    (an optimizer step) are seen. The few copies (W^UK transposed; in bfloat16 models the norms
    and the router widened to float32; int8 scales) are retaken when their source changes in
    place (its version counter moves). Not seen: a parameter replaced by a new tensor, or changed
    through `.data` (which bypasses the version counter): build a new Engine after those."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._lib = library()
        self._keep: list[torch.Tensor] = []
        self._copied: list[tuple[torch.Tensor, int]] = []   # (source, its version) of every copy taken
        cfg = model.config
        dev = model.embed_tokens.weight.device
        if dev.type != "cpu":
            raise Unsupported(f"the fused decode step runs on CPU; this model is on {dev}")
        if cfg.attention_bias:
            raise Unsupported("attention biases are not supported by the fused decode step")
        if getattr(model, "training", False):
            raise Unsupported("the model is in training mode")
        m = self.m = Model()
        m.n_layers, m.D, m.H = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
        m.N, m.R, m.V, m.C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        m.QR, m.vocab = cfg.q_lora_rank or 0, cfg.vocab_size
        m.I_moe, m.E, m.K = cfg.moe_intermediate_size or 0, cfg.n_routed_experts or 0, cfg.num_experts_per_tok or 0
        m.group_limited = int(cfg.topk_method == "group_limited_greedy")
        m.n_group, m.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        m.norm_topk, m.routed_scaling = int(bool(cfg.norm_topk_prob)), float(cfg.routed_scaling_factor)
        attn0 = model.layers[0].self_attn
        m.eps, m.scale, m.rope_amp = cfg.rms_norm_eps, attn0.scale, model.rotary.amplitude
        self.dtype = model.embed_tokens.weight.dtype
        if self.dtype not in _TYPES:
            raise Unsupported(f"the fused decode step takes float32 or bfloat16 models, not {self.dtype}")
        m.cache_type = _TYPES[self.dtype]
        m.inv_freq = self._f32(model.rotary.inv_freq)
        m.embed, m.head = self._mat(model.embed_tokens.weight), self._linear(model.lm_head)
        m.final_norm = self._f32(model.norm.weight)
        self._layers = (Layer * cfg.num_hidden_layers)()
        widths, hidden = [cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, m.head.cols, m.embed.cols], [1]
        for L, block in zip(self._layers, model.layers):
            a = block.self_attn
            L.in_norm, L.post_norm = self._f32(block.input_layernorm.weight), self._f32(block.post_attention_layernorm.weight)
            L.kv_a_norm = self._f32(a.kv_a_layernorm.weight)
            if a.q_lora_rank is None:
                L.q_b = self._linear(a.q_proj)
            else:
                L.q_a, L.q_b, L.q_a_norm = self._linear(a.q_a_proj), self._linear(a.q_b_proj), self._f32(a.q_a_layernorm.weight)
            L.kv_a, L.kv_b, L.o = self._linear(a.kv_a_proj_with_mqa), self._linear(a.kv_b_proj), self._linear(a.o_proj)
            if L.kv_b.type == I8:
                raise Unsupported("an int8 kv_b_proj is not supported by the fused decode step")
            # W^UK transposed to [H * C, N] (a copy: a quarter of kv_b_proj's weight for the small preset).
            w_uk, _ = a._w_uk_uv()
            L.w_ukt = self._mat(w_uk.detach().transpose(1, 2).reshape(-1, w_uk.shape[1]).contiguous(),
                                src=a.kv_b_proj.weight)
            mlp = block.mlp
            dense = mlp.shared_experts if hasattr(mlp, "gate") else mlp
            if dense is not None:
                L.gate, L.up, L.down = self._linear(dense.gate_proj), self._linear(dense.up_proj), self._linear(dense.down_proj)
                hidden.append(L.gate.rows)
            if hasattr(mlp, "gate"):
                self._experts(L, mlp)
            # Per-thread scratch holds 4 widened rows of the widest matrix the step reads.
            widths += [getattr(L, f).cols for f in ("q_a", "q_b", "kv_a", "kv_b", "o", "w_ukt", "gate", "up",
                                                    "down", "gu", "dn")]
        m.max_cols, m.I_max = max(widths), max(hidden + [m.I_moe])
        m.layers = C.addressof(self._layers)
        self._work = torch.empty(0)
        self._cache_ptrs = None

    # ---------------------------------------------------------------- weights
    def _own(self, src: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Keep t alive; if it is a copy of src, note src's version to notice in-place changes."""
        self._keep.append(t)
        if not src.is_inference() and t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
            self._copied.append((src, src._version))
        return t

    def _f32(self, t: torch.Tensor) -> int:
        return self._own(t, t.detach().float().contiguous()).data_ptr()

    def _mat(self, w: torch.Tensor, scale: torch.Tensor | None = None, src: torch.Tensor | None = None) -> Mat:
        w = self._own(w if src is None else src, w.detach() if w.stride(-1) == 1 else w.detach().contiguous())
        if w.dtype == torch.int8:
            typ, sp = I8, self._f32(scale)
        elif w.dtype in _TYPES:
            typ, sp = _TYPES[w.dtype], None
        else:
            raise Unsupported(f"weights of dtype {w.dtype} are not supported by the fused decode step")
        return Mat(w.data_ptr(), sp, w.stride(-2), typ, w.shape[-2], w.shape[-1])

    def _linear(self, lin: nn.Module) -> Mat:
        if getattr(lin, "bias", None) is not None:
            raise Unsupported("linear biases are not supported by the fused decode step")
        if hasattr(lin, "qweight"):   # engine.quant.Int8Linear
            return self._mat(lin.qweight, lin.scale)
        if isinstance(lin, nn.Linear):
            return self._mat(lin.weight)
        raise Unsupported(f"{type(lin).__name__} layers are not supported by the fused decode step")

    def _experts(self, L: Layer, mlp: nn.Module) -> None:
        from ...model.moe import LocalDispatcher
        if not isinstance(mlp.dispatcher, LocalDispatcher):
            raise Unsupported("expert-parallel MoE layers decode with PyTorch ops")
        ex = mlp.experts
        L.moe, L.router = 1, self._f32(mlp.gate.weight)
        if hasattr(ex, "gate_up_proj_q"):   # engine.quant.Int8GroupedExperts
            gu, gus, dn, dns = ex.gate_up_proj_q, ex.gate_up_proj_s, ex.down_proj_q, ex.down_proj_s
        else:
            gu, gus, dn, dns = ex.gate_up_proj, None, ex.down_proj, None
        # Every expert's rows as one matrix ([E * rows, cols], scales likewise): expert e is a block of rows.
        L.gu = self._mat(gu.contiguous().flatten(0, 1), None if gus is None else gus.reshape(-1), src=gu)
        L.dn = self._mat(dn.contiguous().flatten(0, 1), None if dns is None else dns.reshape(-1), src=dn)

    # ------------------------------------------------------------------- step
    def __call__(self, tokens_B1: torch.Tensor, positions: list[int], kv_len: int, cache) -> torch.Tensor:
        """One decode step for cache slots [0, B): token b is written at positions[b] and attends to
        [0, min(positions[b] + 1, kv_len)). -> float32 logits [B, vocab]."""
        B = len(positions)
        if any(t._version != v for t, v in self._copied):   # a copied weight was changed in place
            self.__init__(self.model)
        if cache.dtype != self.dtype:
            raise Unsupported(f"the cache is {cache.dtype} but the model is {self.dtype}")
        if not (B <= cache.slots and 0 < kv_len <= cache.max_len and 0 <= min(positions) and max(positions) < cache.max_len):
            raise ValueError(f"decode positions {positions} / length {kv_len} do not fit a cache of "
                             f"{cache.slots} slots x {cache.max_len} positions.")
        if self._cache_ptrs is None or self._cache_ptrs[0] is not cache:
            width = self.m.C + self.m.R
            if len(cache.joint) != self.m.n_layers or any(
                    j.shape[-1] != width or not j.is_contiguous() or j.device.type != "cpu" for j in cache.joint):
                raise ValueError(f"this cache does not fit the model: it needs {self.m.n_layers} contiguous CPU "
                                 f"layers of [slots, max_len, {width}].")
            ptrs = (C.c_void_p * len(cache.joint))(*[j.data_ptr() for j in cache.joint])
            self._cache_ptrs = (cache, ptrs, cache.joint[0].stride(0))
        _, ptrs, slot_stride = self._cache_ptrs
        threads = torch.get_num_threads()
        need = self._lib.dsv2_work_floats(C.byref(self.m), B, kv_len, threads)
        if self._work.numel() < need:
            self._work = torch.empty(int(need * 1.25) + 1024)
        tokens = tokens_B1.reshape(-1).to(torch.int64).contiguous()
        if tokens.numel() != B:
            raise ValueError(f"{tokens.numel()} tokens for {B} positions: give one token per decoding slot.")
        pos = (C.c_int64 * B)(*positions)
        logits = torch.empty(B, self.m.vocab)
        bad = self._lib.dsv2_decode(C.byref(self.m), B, tokens.data_ptr(), C.addressof(pos), kv_len, ptrs,
                                    slot_stride, logits.data_ptr(), self._work.data_ptr(), threads)
        if bad:
            raise ValueError(f"token ids must be in [0, {self.m.vocab}), got {tokens.tolist()}.")
        return logits
