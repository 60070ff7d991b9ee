"""One batched decode forward: every decoding slot feeds one token through the absorbed MLA path.

Kept apart from the engine's bookkeeping: its inputs are a [B, 1] token tensor, the slots'
positions and the attended length, and it returns [B, V] logits.

On CPU the step runs by default as one call into the fused C decode step (native),
the same math with float32 activations, 2-5x faster than the eager step on the project's
machine; `native=False` (or DSV2_NATIVE=0) keeps PyTorch ops, and where it cannot be built
(no C compiler) or does not apply (GPU, biases) PyTorch ops are used with a one-line notice
only for a missing compiler.

With compile=True the PyTorch step is compiled as one graph: `torch.compile(fullgraph=True)`,
and on CUDA with mode="reduce-overhead" (CUDA graphs). It has no graph breaks because the
engine prepares the model first (engine/optimize.py: the MoE routes and permutes on the device,
the routed experts are one custom operator); tests/engine/test_compile.py checks that with
`torch._dynamo.explain`. Shapes are dynamic (batch and attended length), so a new batch size
or context length does not recompile. docs/performance.md compares it with the fused C step.
Where compilation fails, decoding falls back to eager with a one-line notice on stderr.
"""

from __future__ import annotations

import sys

import torch

from ..model.attention import KVStep
from ..model.mask import causal_mask
from .. import native as nat


class DecodeStep:
    def __init__(self, model, compile: bool | None = None, native: bool | None = None):
        self.model = model
        self.fn = self._eager
        self.compiled = False
        self.native = None
        if native or (native is None and not compile and _native_applies(model)):
            if native and not nat.available(notice=False):
                raise ValueError(f"the fused decode step is unavailable: {nat.why_unavailable()}.")
            if nat.available():
                try:
                    self.native = nat.NativeDecoder(model)
                except nat.Unsupported as e:
                    if native:
                        raise ValueError(f"the fused decode step cannot run this model: {e}.") from e
        if compile:
            try:
                mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
                self.fn = torch.compile(self._eager, fullgraph=True, dynamic=True, mode=mode)
                self.compiled = True
            except Exception as e:  # noqa: BLE001 - any failure means: decode eagerly
                self._fallback(e)

    def _fallback(self, e: Exception) -> None:
        print(f"dsv2: torch.compile unavailable for decode ({type(e).__name__}: {str(e)[:120]}); "
              "decoding eagerly.", file=sys.stderr)
        self.fn, self.compiled = self._eager, False

    def _eager(self, tokens_B1, positions_B1, kv_len: int, kv, masked: bool) -> torch.Tensor:
        # slots of different lengths: each attends to its own prefix only
        mask = causal_mask(positions_B1, kv_len) if masked else None
        step = KVStep(positions_B1, kv_len, mask)
        return self.model(tokens_B1, kv=kv, step=step, absorb=True, last_only=True)[:, 0]

    def __call__(self, tokens_B1, pos: list[int], kv_len: int, cache, hi: int,
                 decoding: list[int] | None = None) -> torch.Tensor:
        """Logits [hi, V] for cache slots [0, hi) (tokens_B1 and pos give every slot's), or, with
        `decoding` (ascending slots), [len(decoding), V] for those. The fused step then runs only
        those rows, wherever their slots lie; the PyTorch step runs [0, hi) and keeps them."""
        if self.native is not None:
            try:
                if decoding is not None and len(decoding) < hi:
                    return self.native(tokens_B1[decoding], [pos[s] for s in decoding], kv_len, cache, slots=decoding)
                return self.native(tokens_B1, pos, kv_len, cache)
            except nat.Unsupported as e:   # e.g. weights changed to a dtype it does not read: PyTorch ops from now on
                print(f"dsv2: fused CPU decode step stopped ({e}); decoding with PyTorch ops.", file=sys.stderr)
                self.native = None
        positions_B1 = torch.tensor(pos, dtype=torch.long, device=tokens_B1.device)[:, None]
        # Unmasked when every row attends to exactly [0, kv_len) (e.g. batch 1).
        masked = any(p != kv_len - 1 for p in pos)
        args = (tokens_B1, positions_B1, kv_len, cache.layers(slice(0, hi)), masked)
        if not self.compiled:
            logits = self.fn(*args)
        else:
            try:
                logits = self.fn(*args)
            except Exception as e:  # noqa: BLE001
                self._fallback(e)
                logits = self.fn(*args)
        return logits[decoding] if decoding is not None and len(decoding) < hi else logits


def _native_applies(model) -> bool:
    from ..model import DeepseekV2
    return (isinstance(model, DeepseekV2) and model.embed_tokens.weight.device.type == "cpu"
            and not model.config.attention_bias)
