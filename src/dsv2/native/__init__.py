"""The fused CPU decode step: every layer of one decode step in a single PyTorch operator call.

On a CPU, decoding a few tokens is bound by per-op dispatch and by the bytes of weights
read, not by arithmetic: the eager step issues thousands of aten calls per token. The
operator torch.ops.dsv2.decode_step (decode.cpp's kernels behind op.cpp's checks) runs the
same math (absorbed MLA over the latent cache, DeepSeekMoE with greedy or group-limited
routing) with float32 activations (int8 rows multiply them rounded to int16; a bfloat16
model's batched matmuls and attention round them to bfloat16), reading float32, bfloat16,
int8 (`quantize_int8`) or block-scaled float8 (quant/fp8.py) weights straight from the
model's tensors, so nothing is copied per step, and a latent cache in any of
engine/cache.py's formats, rows read as stored. op.cpp's int8_mm gives the int8 layers
(prefill) the same integer products.

It is a registered custom operator, not a foreign-function call: the weights travel as
tensors, op.cpp checks every shape, dtype and layout against the config (a mismatch is a
ValueError naming the tensor), and a fake kernel gives torch.compile its output shape.
It is built on first use (build.py) and cached per machine. Without a compiler the engine
decodes with PyTorch ops and says so once on stderr; DSV2_NATIVE=0 turns the fused step off.

    dec = NativeDecoder(model)            # raises Unsupported (with the reason) if it cannot run
    logits_BV = dec(tokens_B1, positions, kv_len, cache)   # float32 [B, vocab]
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from . import build
from .build import Unsupported

__all__ = ["NativeDecoder", "Unsupported", "available", "why_unavailable"]

_noticed = False


def why_unavailable() -> str:
    """Why the fused step cannot be used here ("" when it can)."""
    if os.environ.get("DSV2_NATIVE", "1") == "0":
        return "DSV2_NATIVE=0 is set"
    try:
        build.load()
    except Unsupported as e:
        return str(e)
    return ""


def available(notice: bool = True) -> bool:
    """Whether the fused step can be used here; when it cannot be built, says why once on stderr."""
    global _noticed
    why = why_unavailable()
    if why and why == build.error() and notice and not _noticed:   # a build failure, not a switch
        _noticed = True
        print(f"dsv2: fused CPU decode step unavailable ({why}); decoding with PyTorch ops.", file=sys.stderr)
    return not why


_TYPES = (torch.float32, torch.bfloat16)
_CACHE_CODES = {torch.float32: 0, torch.bfloat16: 1}   # unpacked caches; packed ones carry their code


def fp8_block(model) -> tuple[int, int]:
    """The float8 weights' block size (0, 0 when none are float8)."""
    return tuple(getattr(model, "fp8_block", None) or (0, 0))


class NativeDecoder:
    """The model's weights as the operator's flat tensor list: views of its own tensors, so in-place
    updates (an optimizer step) are seen. The few copies (W^UK transposed; in bfloat16 models the
    norms and the router widened to float32; int8 scales) are retaken when a trainable source (one
    that requires grad) changes in place: its version counter moves, which each step checks. Not
    seen: a parameter replaced by a new tensor, one changed through `.data` (which bypasses the
    version counter), or a buffer edited in place (int8 scales; checking those ~80 counters took
    ~3% of an int8 batch-1 step): build a new Engine after those."""

    def __init__(self, model: nn.Module):
        build.load()
        self._step = torch.ops.dsv2.decode_step.default   # looked up once: the attribute chain costs per step
        self.model = model
        self._sources: list[torch.Tensor] = []   # the source of every copy taken,
        self._versions: list[int] = []           # and its version then
        cfg = model.config
        dev = model.embed_tokens.weight.device
        if dev.type != "cpu":
            raise Unsupported(f"the fused decode step runs on CPU; this model is on {dev}")
        if cfg.attention_bias:
            raise Unsupported("attention biases are not supported by the fused decode step")
        if getattr(model, "training", False):
            raise Unsupported("the model is in training mode")
        self.dtype = model.embed_tokens.weight.dtype
        if self.dtype not in _TYPES:
            raise Unsupported(f"the fused decode step takes float32 or bfloat16 models, not {self.dtype}")
        global_slots, layer_slots, int_names, float_names = torch.ops.dsv2.layout()
        ints = dict(n_layers=cfg.num_hidden_layers, D=cfg.hidden_size, H=cfg.num_attention_heads,
                    N=cfg.qk_nope_head_dim, R=cfg.qk_rope_head_dim, V=cfg.v_head_dim, C=cfg.kv_lora_rank,
                    QR=cfg.q_lora_rank or 0, I_moe=cfg.moe_intermediate_size or 0, E=cfg.n_routed_experts or 0,
                    K=cfg.num_experts_per_tok or 0, n_group=cfg.n_group or 1, topk_group=cfg.topk_group or 1,
                    group_limited=int(cfg.topk_method == "group_limited_greedy"),
                    norm_topk=int(bool(cfg.norm_topk_prob)), vocab=cfg.vocab_size,
                    **dict(zip(("fp8_bn", "fp8_bk"), fp8_block(model))))
        floats = dict(eps=cfg.rms_norm_eps, scale=model.layers[0].self_attn.scale,
                      routed_scaling=float(cfg.routed_scaling_factor), rope_amp=model.rotary.amplitude)
        self.ints, self.floats = [ints[n] for n in int_names], [float(floats[n]) for n in float_names]
        g = dict(inv_freq=self._f32(model.rotary.inv_freq), final_norm=self._f32(model.norm.weight))
        g.update(self._mat("embed", model.embed_tokens.weight), **self._linear("head", model.lm_head))
        self.weights = _ordered(g, global_slots)
        for block in model.layers:
            self.weights += _ordered(self._layer(block), layer_slots)
        self._work = torch.empty(0)
        self._sized = (0, 0)   # (batch, threads) the work space is known to fit

    # ---------------------------------------------------------------- weights
    def _own(self, src: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """If t is a copy of a trainable src, note src's version to notice in-place changes."""
        if src.requires_grad and not src.is_inference() and t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
            self._sources.append(src)
            self._versions.append(src._version)
        return t

    def _f32(self, t: torch.Tensor) -> torch.Tensor:
        return self._own(t, t.detach().float().contiguous())

    def _mat(self, name: str, w: torch.Tensor, scale: torch.Tensor | None = None,
             src: torch.Tensor | None = None) -> dict:
        """{name: the [rows, cols] weight, name_scale: its int8 row scales or None}."""
        w = self._own(w if src is None else src, w.detach() if w.stride(-1) == 1 else w.detach().contiguous())
        if w.dtype not in (torch.int8, torch.float8_e4m3fn) + _TYPES:
            raise Unsupported(f"weights of dtype {w.dtype} are not supported by the fused decode step")
        scaled = w.dtype in (torch.int8, torch.float8_e4m3fn)
        if scaled != (scale is not None):
            raise Unsupported(f"{name} is {w.dtype} {'without' if scaled else 'with'} scales (a quantized layer "
                              "cast to another dtype?)")
        return {name: w, f"{name}_scale": self._f32(scale) if scaled else None}

    def _linear(self, name: str, lin: nn.Module) -> dict:
        if getattr(lin, "bias", None) is not None:
            raise Unsupported("linear biases are not supported by the fused decode step")
        if hasattr(lin, "qweight"):   # quant.int8.Int8Linear
            return self._mat(name, lin.qweight, lin.scale)
        if hasattr(lin, "weight_scale_inv"):   # quant.fp8.Fp8Linear
            return self._mat(name, lin.weight, lin.weight_scale_inv)
        if isinstance(lin, nn.Linear):
            return self._mat(name, lin.weight)
        raise Unsupported(f"{type(lin).__name__} layers are not supported by the fused decode step")

    def _layer(self, block: nn.Module) -> dict:
        a = block.self_attn
        d = dict(in_norm=self._f32(block.input_layernorm.weight), post_norm=self._f32(block.post_attention_layernorm.weight),
                 kv_a_norm=self._f32(a.kv_a_layernorm.weight))
        if a.q_lora_rank is None:
            d.update(self._linear("q_b", a.q_proj))
        else:
            d.update(self._linear("q_a", a.q_a_proj), **self._linear("q_b", a.q_b_proj),
                     q_a_norm=self._f32(a.q_a_layernorm.weight))
        d.update(self._linear("kv_a", a.kv_a_proj_with_mqa), **self._linear("kv_b", a.kv_b_proj),
                 **self._linear("o", a.o_proj))
        if d["kv_b"].dtype in (torch.int8, torch.float8_e4m3fn):
            raise Unsupported(f"a {d['kv_b'].dtype} kv_b_proj is not supported by the fused decode step")
        # W^UK transposed to [H * C, N] (a copy: a quarter of kv_b_proj's weight for the small preset).
        w_uk, _ = a._w_uk_uv()
        d.update(self._mat("w_ukt", w_uk.detach().transpose(1, 2).reshape(-1, w_uk.shape[1]).contiguous(),
                           src=a.kv_b_proj.weight))
        mlp = block.mlp
        dense = mlp.shared_experts if hasattr(mlp, "gate") else mlp
        if dense is not None:
            d.update(self._linear("gate", dense.gate_proj), **self._linear("up", dense.up_proj),
                     **self._linear("down", dense.down_proj))
        if hasattr(mlp, "gate"):
            d.update(self._experts(mlp))
        return d

    def _experts(self, mlp: nn.Module) -> dict:
        from ..model.moe import LocalDispatcher
        if not isinstance(mlp.dispatcher, LocalDispatcher):
            raise Unsupported("expert-parallel MoE layers decode with PyTorch ops")
        ex = mlp.experts
        if hasattr(ex, "gate_up_proj_q"):   # quant.int8.Int8GroupedExperts
            gu, gus, dn, dns = ex.gate_up_proj_q, ex.gate_up_proj_s, ex.down_proj_q, ex.down_proj_s
        elif hasattr(ex, "gate_up_proj_scale_inv"):   # quant.fp8.Fp8GroupedExperts: the stacks, blocks per expert
            gu, gus, dn, dns = ex.gate_up_proj, ex.gate_up_proj_scale_inv, ex.down_proj, ex.down_proj_scale_inv
        else:
            gu, gus, dn, dns = ex.gate_up_proj, None, ex.down_proj, None
        # Every expert's rows as one matrix ([E * rows, cols], scales likewise): expert e is a block of rows.
        return dict(router=self._f32(mlp.gate.weight),
                    **self._mat("gu", gu.contiguous().flatten(0, 1), None if gus is None else gus.reshape(-1), src=gu),
                    **self._mat("dn", dn.contiguous().flatten(0, 1), None if dns is None else dns.reshape(-1), src=dn))

    # ------------------------------------------------------------------- step
    def work_floats(self, batch: int) -> int:
        """Floats of work space the operator needs for a step of `batch` tokens (at any length)."""
        return torch.ops.dsv2.work_floats(self.weights, self.ints, self.floats, batch)

    def __call__(self, tokens_B1: torch.Tensor, positions: list[int], kv_len: int, cache,
                 slots: list[int] | None = None) -> torch.Tensor:
        """One decode step for cache slots [0, B), or the distinct `slots`: token b is written in its
        slot at positions[b] and attends to [0, min(positions[b] + 1, kv_len)) of it.
        -> float32 logits [B, vocab]."""
        if [t._version for t in self._sources] != self._versions:   # a copied weight was changed in place
            self.__init__(self.model)
        fmt = cache.fmt.code if cache.fmt is not None else _CACHE_CODES.get(cache.dtype)
        if fmt is None:
            raise Unsupported(f"a {cache.kv_cache_dtype} cache is not read by the fused decode step")
        B, (B0, t0), threads = len(positions), self._sized, torch.get_num_threads()
        if not (B <= B0 and threads == t0):   # the need grows with the batch
            fit = (max(B, B0), threads) if threads == t0 else (B, threads)
            need = self.work_floats(fit[0])
            if self._work.numel() < need:
                self._work = torch.empty(int(need * 1.25) + 1024)
            self._sized = fit
        return self._step(self.weights, self.ints, self.floats, tokens_B1, torch.tensor(positions, dtype=torch.long),
                          kv_len, cache.joint, fmt, cache.scales, self._work,
                          None if slots is None else torch.tensor(slots, dtype=torch.long))


def _ordered(d: dict, names: list[str]) -> list:
    """d's tensors in the operator's slot order (None where the model has no such weight)."""
    assert set(d) <= set(names), f"weights the operator has no slot for: {sorted(set(d) - set(names))}"
    return [d.get(n) for n in names]
