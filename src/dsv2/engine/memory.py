"""Memory pre-flight: will this checkpoint, loaded this way, with this cache, fit in this machine?

Estimated before any weight is read, from config.json and the shard headers:

    weights      every parameter and buffer as it will be held: exact, since the model is built
                 on the meta device and quantized there, as load_pretrained builds it
    loading      while loading: the largest checkpoint tensor as stored, plus quantization's
                 float32 working copy (int8 rounds 4,096 rows at a time; fp8 a whole matrix)
    cache        the latent cache: slots x max_len x bytes per token in its format (all touched:
                 the cache is zeroed when made)
    activations  one prefill chunk at the far end of the context: hidden states, the MoE's
                 routed rows, the decompressed keys and values of the whole window, the largest
                 matrix widened for prefill, and the logits
    runtime      this process as it stands (Python, torch), plus what loading adds beside the
                 weights (libraries, thread pools, the allocator's slack): RUNTIME_EXTRA

    peak = runtime + weights + max(loading, cache + activations)

`bench/full_size.py` measures the estimate against the peak RSS of a whole run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

GiB = 2**30
RUNTIME_EXTRA = 160 * 2**20   # measured: RSS after loading minus weights minus RSS before (V2-Lite's widths)
INT8_ROWS = 4096              # quant/int8.quantize_rows' chunk
HEADROOM = 1.1                # a plan fits when 1.1 x what it still needs is available


class DoesNotFit(ValueError):
    """The configuration asked for does not fit in the memory this machine has available."""


def rss_bytes() -> int:
    """This process's resident memory now."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_bytes() -> int | None:
    """Memory the system can give this process now (MemAvailable, and a cgroup v2 limit if one is
    set); None where it cannot be read."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used) if avail is not None else int(limit) - used
    except (OSError, ValueError):
        pass
    return avail


@dataclass
class MemoryPlan:
    what: str           # e.g. "DeepSeek-V2 (27 layers) int8, 1 slot x 4,096 positions, bfloat16 cache"
    runtime: int
    weights: int
    loading: int
    cache: int
    activations: int
    available: int | None

    @property
    def peak(self) -> int:
        return self.runtime + self.weights + max(self.loading, self.cache + self.activations)

    @property
    def needed(self) -> int:
        """What the process must still get from the system: the peak less what it holds now."""
        return self.peak - rss_bytes()

    def fits(self) -> bool:
        """With 10% headroom: the allocator keeps some freed blocks, and measured peaks came out
        up to 7% above the estimate (docs/full-size.md)."""
        return self.available is None or self.needed * HEADROOM <= self.available

    def table(self) -> str:
        rows = [("weights", self.weights), ("loading (transient)", self.loading), ("latent cache", self.cache),
                ("activations (prefill chunk)", self.activations), ("runtime (process + libraries)", self.runtime),
                ("peak estimate", self.peak)]
        lines = [f"memory pre-flight: {self.what}"] + [f"  {k:<32}{v / GiB:>8.2f} GiB" for k, v in rows]
        if self.available is not None:
            lines.append(f"  {'available now':<32}{self.available / GiB:>8.2f} GiB  ->  "
                         + ("fits" if self.fits() else "does NOT fit"))
        return "\n".join(lines)


def check_cache_fits(nbytes: int, slots: int, max_len: int) -> None:
    """Refuse, in one sentence, a latent cache larger than the memory available now."""
    avail = available_bytes()
    if avail is not None and nbytes > avail:
        raise DoesNotFit(f"a latent cache of {slots} slots x {max_len:,} positions needs {nbytes / GiB:.1f} GiB "
                         f"but {avail / GiB:.1f} GiB is available: lower max_len or the slots, or store it as "
                         "kv_cache_dtype fp8 or mixed.")


def plan_memory(path: str | os.PathLike, dtype=None, quantize: str | None = None, max_len: int = 4096,
                slots: int = 1, kv_cache_dtype: str | None = None, prefill_chunk: int = 2048) -> MemoryPlan:
    """The memory plan of loading checkpoint `path` and running an engine of `slots` x `max_len`."""
    from ..checkpoint import checkpoint_tensors, empty_model
    from .cache import bytes_per_token, check_kv_cache_dtype
    model, dtype = empty_model(path, dtype, quantize)
    cfg = model.config
    check_kv_cache_dtype(kv_cache_dtype)
    max_len = min(max_len, cfg.max_position_embeddings)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    # One matrix of each quantized tensor (an expert's, for stacked experts), but the head: prefill
    # widens them for its matmuls, and it asks the head for the last position alone.
    quantized = [t[0] if t.dim() == 3 else t for name, t in model.named_buffers()
                 if t.dtype in (torch.int8, torch.float8_e4m3fn) and t.dim() >= 2 and not name.startswith("lm_head")]
    # Loading: the largest stored tensor, plus the float32 rows quantization works on.
    stored = checkpoint_tensors(path)
    largest = max(n for _, _, n in stored.values())
    head = next((t for name, t in model.named_buffers() if name.startswith("lm_head") and t.dtype == torch.int8), None)
    if quantize == "int8":
        work = max(min(t.shape[0], INT8_ROWS) * t.shape[1] for t in quantized + [head]) * 4 * 2
    elif quantize == "fp8" or any(d.startswith("F8") for d, _, _ in stored.values()):
        work = max(t.numel() for t in quantized) * 4 * 3
    else:
        work = 0
    cache = slots * max_len * bytes_per_token(cfg, kv_cache_dtype, dtype)
    activations = _activations(cfg, min(prefill_chunk, max_len), max_len, dtype, quantized)
    kv = kv_cache_dtype if kv_cache_dtype not in (None, "auto") else str(dtype).split(".")[-1]
    what = (f"{Path(path).name}: {cfg.num_hidden_layers} layers, {quantize or str(dtype).split('.')[-1]} weights, "
            f"{slots} slot{'s' if slots > 1 else ''} x {max_len:,} positions, {kv} cache")
    return MemoryPlan(what, rss_bytes() + RUNTIME_EXTRA, weights, largest + work, cache, activations,
                      available_bytes())


def _activations(cfg, T: int, S: int, dtype: torch.dtype, quantized: list[torch.Tensor]) -> int:
    """Bytes live in one layer while a T-token prefill chunk attends to S positions."""
    e = dtype.itemsize
    d, H = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    hidden = 6 * T * d * 4                                                  # residual, norms, float32 logits path
    attention = S * H * (cfg.qk_nope_head_dim + cfg.v_head_dim + 2 * qk) * e + 2 * T * H * qk * e
    ffn = T * 3 * max(cfg.intermediate_size, cfg.num_experts_per_tok * cfg.moe_intermediate_size) * e
    widened = 2 * max(t.numel() for t in quantized) * e if quantized else 0
    logits = 2 * cfg.vocab_size * 4
    return hidden + attention + ffn + widened + logits


def check_memory(plan: MemoryPlan, alternatives=()) -> None:
    """Raise one sentence if `plan` does not fit: the figures, and the first of `alternatives`
    ((option text, plan) pairs, in order of preference; an iterator plans each only when asked)
    that would."""
    if plan.fits():
        return
    msg = (f"{plan.what} needs about {plan.needed / GiB:.1f} GiB more memory (weights {plan.weights / GiB:.1f}, "
           f"latent cache {plan.cache / GiB:.1f}, the rest {(plan.peak - plan.weights - plan.cache) / GiB:.1f} GiB) "
           f"but {plan.available / GiB:.1f} GiB is available")
    for option, alt in alternatives:
        if alt.fits():
            raise DoesNotFit(f"{msg}; {option} would need about {alt.needed / GiB:.1f} GiB.")
    raise DoesNotFit(f"{msg}, and no smaller option fits: free memory or use a larger machine.")


def preflight(path, dtype=None, quantize: str | None = None, max_len: int = 4096, slots: int = 1,
              kv_cache_dtype: str | None = None) -> MemoryPlan:
    """Plan, and refuse with the figure and an option that fits (a quantization, a cache format,
    a shorter context or fewer slots) before any weight is read. Returns the plan."""
    plan = plan_memory(path, dtype, quantize, max_len, slots, kv_cache_dtype)
    kw = dict(dtype=dtype, quantize=quantize, max_len=max_len, slots=slots, kv_cache_dtype=kv_cache_dtype)
    check_memory(plan, ((option, plan_memory(path, **(kw | change))) for option, change in _options(kw)))
    return plan


def _options(kw: dict):
    """(flag text, the settings it changes) to try, in order: a quantization, the mixed cache,
    halved contexts down to 512, one slot (the last three with int8 when nothing was quantized)."""
    if kw["quantize"] is None:
        yield from ((f"--quantize {q}", {"quantize": q}) for q in ("int8", "fp8"))
    base = {"quantize": kw["quantize"] or "int8"}
    flag = "" if kw["quantize"] else " with --quantize int8"
    if kw["kv_cache_dtype"] not in ("mixed", "fp8", "int8"):
        yield f"--kv-cache-dtype mixed{flag}", base | {"kv_cache_dtype": "mixed"}
    length = kw["max_len"] // 2
    while length >= 512:
        yield f"--max-len {length}{flag}", base | {"max_len": length}
        length //= 2
    if kw["slots"] > 1:
        yield f"--slots 1{flag}", base | {"slots": 1}
