"""The DeepSeek-V2 decoder: embedding -> L x (RMSNorm, MLA, RMSNorm, FFN or MoE) -> RMSNorm -> head.

Also answers the practical questions about a config without building weights:
parameters (total, active per token), FLOPs per token, KV-cache bytes per token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import MLA, KVStep
from .ffn import SwiGLU
from .loss import check_targets, lm_head_cross_entropy
from .mask import causal_mask, packed_positions
from .moe import MoE, MoEHooks, GroupedExperts, Gate
from .norm import RMSNorm
from .linear import Linear
from .rope import RotaryEmbedding


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, kv=None, step=None, absorb=False, moe_hooks: MoEHooks | None = None,
                rows=None):
        """rows [B, R]: only these positions' outputs ([B, R, D]), the FFN run on them alone."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, kv, step, absorb, rows)
        x = (x if rows is None else torch.take_along_dim(x, rows[..., None], dim=1)) + a
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, moe_hooks) if self.is_moe else self.mlp(h))


class DeepseekV2(nn.Module):
    """A DeepSeek-V2 causal LM. `model(input_ids)` -> float logits [B, T, vocab]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for every matrix; norms to 1; biases to 0."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std, generator=generator)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, Gate):
                m.weight.normal_(0.0, std, generator=generator)
            elif isinstance(m, GroupedExperts):
                m.gate_up_proj.normal_(0.0, std, generator=generator)
                m.down_proj.normal_(0.0, std, generator=generator)
            elif isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
        self.rotary.inv_freq.copy_(RotaryEmbedding(self.config).inv_freq)

    # --------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv: list | None = None, step: KVStep | None = None, absorb: bool = False,
                last_only: bool = False, targets: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                moe_hooks: MoEHooks | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab] in float32 (or [B, 1, vocab] with last_only).

        With `targets` [B, T] (the token each position should predict; IGNORE_INDEX = -100 is
        skipped) it returns the summed cross-entropy instead, a float32 scalar, computed by
        chunks without ever holding the [B, T, vocab] logits (model/loss.py).

        Without `kv` this is plain causal attention over the given tokens (training, scoring).
        With `kv` (one cache LayerView per layer, engine/cache.py) and `step`, the new tokens' latents
        are written to the cache at `step.positions` and attention spans the cache.

        With `segment_ids` [B, T] (packed rows: several documents per row, each a run of equal
        ids) attention stays inside each document and, unless `positions` are given, positions
        (RoPE included) restart at 0 for each one (model/mask.py).

        `dtype` is the activations' dtype (default: the weights'): every matmul runs in it, the
        weights cast where they differ (model/linear.py). The head computes in the weights' dtype
        for the last position alone (last_only), so its matrix is never widened for one row.

        `moe_hooks` (training): token dropping and routing capture for every MoE layer (model/moe.py).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}.")
        if targets is not None:
            check_targets(targets, input_ids, self.config.vocab_size)
        if segment_ids is not None:
            if kv is not None or segment_ids.shape != input_ids.shape:
                raise ValueError(f"segment_ids must be [batch, seq] like input_ids {tuple(input_ids.shape)}, "
                                 "and are for cache-free forwards (training, scoring).")
            if positions is None:
                positions = packed_positions(segment_ids)
            step = KVStep(positions, input_ids.shape[1], causal_mask(positions, input_ids.shape[1], segment_ids))
        h = self.hidden_states(input_ids, positions, kv, step, absorb, dtype, moe_hooks)
        if targets is not None:
            return lm_head_cross_entropy(h.reshape(-1, h.shape[-1]), self.lm_head.weight, targets.reshape(-1))
        if last_only:
            h = h[:, -1:].to(self.embed_tokens.weight.dtype)
        return self.lm_head(h).float()

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        """Final hidden states [B, T, D] -> logits [B, T, vocab] (in h's dtype)."""
        return self.lm_head(h_BTD)

    def hidden_states(self, input_ids, positions=None, kv=None, step=None, absorb=False,
                      dtype: torch.dtype | None = None, moe_hooks: MoEHooks | None = None,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, D]. rows [B, R] (indices into T): only these positions' states
        are wanted, [B, R, D]; the last layer then runs its attention output projection and FFN on
        them alone (scoring takes logits at a few positions)."""
        if positions is None:
            positions = step.positions if step is not None else torch.arange(
                input_ids.shape[1], device=input_ids.device)[None].expand(input_ids.shape[0], -1)
        cos, sin = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        if dtype is not None:
            x = x.to(dtype)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if kv is None else kv[i], step, absorb, moe_hooks, rows if i == last else None)
        return self.norm(x)

    # ------------------------------------------------------------ accounting
    def num_params(self) -> int:
        """Every weight, counted once (tied weights once; int8 / float8 matrices, which quantized
        models hold as buffers beside their scales, included)."""
        quantized = sum(b.numel() for b in self.buffers() if b.dtype in (torch.int8, torch.float8_e4m3fn))
        return sum(p.numel() for p in self.parameters()) + quantized

    def active_params(self) -> int:
        """Parameters one token's forward multiplies by: embedding lookup out, output head in,
        only K_r of the N_r routed experts in each MoE layer."""
        cfg = self.config
        n = self.num_params() - self.embed_tokens.weight.numel()
        if cfg.tie_word_embeddings:
            n += self.lm_head.weight.numel()
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        return n - n_moe * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert

    def flops_per_token(self, seq_len: int, training: bool = False) -> float:
        """Matmul FLOPs per token: 2 x active params, plus causal attention over seq_len
        (2 x H x (d_qk + d_v) x seq_len/2 per layer, naive path). Training: x3 (fwd + bwd)."""
        cfg = self.config
        attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
        fwd = 2 * self.active_params() + attn
        return 3 * fwd if training else fwd

    def kv_cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16, per_layer: bool = False) -> int:
        """(d_c + d_h^R) x dtype size per layer: the latent and the shared rope key."""
        cfg = self.config
        b = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * torch.empty((), dtype=dtype).element_size()
        return b if per_layer else b * cfg.num_hidden_layers

    def summary(self, dtype: torch.dtype = torch.bfloat16, kv_cache: tuple[int, str] | None = None) -> str:
        """kv_cache: (bytes per token, format name) of a packed cache format to report instead of dtype's."""
        cfg = self.config
        mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
        mla = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
        nbytes, name = kv_cache or (self.kv_cache_bytes_per_token(dtype), str(dtype).split(".")[-1])
        return (f"parameters: {_human(self.num_params())} total, {_human(self.active_params())} active per token\n"
                f"forward FLOPs per token (4K context): {_human(self.flops_per_token(4096))}\n"
                f"KV cache per token: {nbytes:,} bytes in {name} ({mla} elements, {nbytes * 8 / mla:.2f} bits each; "
                f"MHA with the same heads would cache {mha}, {mha / mla:.1f}x more)")


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))
