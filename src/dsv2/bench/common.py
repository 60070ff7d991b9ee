"""What every benchmark shares: random checkpoints and shards, timing, the roofline, child processes.

Timing on a shared machine: other jobs' bursts hit single steps, so decode rates are given
as the best window of consecutive steps beside the whole-run average, and CPU seconds of
this process beside wall seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1]      # src/dsv2: the corpus for a benchmark tokenizer


# ------------------------------------------------------------------ inputs
def random_checkpoint(path: str | Path, preset: str, tokenizer: bool = False, seed: int = 0):
    """Write the preset with random weights (init_weights, seeded) as a Hugging Face directory,
    with a byte-level BPE tokenizer trained on dsv2's own sources if asked; returns the model."""
    from ..checkpoint import save_pretrained
    from ..config import ModelConfig
    from ..model import DeepseekV2
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_preset(preset)
    if tokenizer:
        _bpe_tokenizer(path, min(cfg.vocab_size, 4096))
    model = DeepseekV2(cfg)
    model.init_weights(torch.Generator().manual_seed(seed))
    save_pretrained(model.eval(), path, tokenizer_dir=path if tokenizer else None)
    return model


def source_texts() -> list[str]:
    """dsv2's own Python sources: the corpus of every benchmark tokenizer (a few MB, offline)."""
    return [f.read_text(errors="ignore") for f in sorted(SRC.rglob("*.py"))]


def _bpe_tokenizer(path: Path, vocab_size: int) -> None:
    from ..data.bpe import BOS, EOS, byte_level_bpe
    byte_level_bpe(source_texts(), vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))


def random_shards(root: str | Path, vocab: int, tokens: int, val_tokens: int = 4096) -> Path:
    """Uniform random uint16 token shards + card.json, as `dsv2 data prepare` writes them."""
    import numpy as np
    root = Path(root)
    rng = np.random.default_rng(0)
    for split, n in (("train", tokens), ("val", val_tokens)):
        rng.integers(2, vocab, n, dtype=np.uint16).tofile(root / f"{split}_00000.bin")
    card = {"documents": {"train": 1, "val": 1}, "tokens": {"train": tokens, "val": val_tokens},
            "vocab_size": vocab, "dtype": "uint16", "bos_id": 0, "eos_id": 1, "tokenizer": "",
            "unigram_val_loss": float(np.log(vocab)),
            "shards": {"train": [{"file": "train_00000.bin", "tokens": tokens}],
                       "val": [{"file": "val_00000.bin", "tokens": val_tokens}]}, "skipped": []}
    (root / "card.json").write_text(json.dumps(card))
    return root


def random_prompts(B: int, T: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(2, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ timing
def timed(step, cuda: bool = False) -> tuple[float, float]:
    """One call -> (wall seconds, process CPU seconds): on a shared CPU the second is steadier."""
    if cuda:
        torch.cuda.synchronize()
    t, c = time.perf_counter(), time.process_time()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def best_time(fn, repeats: int = 5) -> tuple[float, float]:
    """-> (best wall seconds of one call, CPU seconds per call over all repeats)."""
    best, cpu = float("inf"), time.process_time()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, (time.process_time() - cpu) / repeats


def best_window(times: list[float], tokens_per_step: int, window: int = 8) -> float:
    """Tokens/s over the fastest run of `window` consecutive steps (non-overlapping windows)."""
    windows = [sum(times[i:i + window]) for i in range(0, len(times) - window + 1, window)] or [sum(times)]
    return tokens_per_step * min(window, len(times)) / min(windows)


def decode_rates(step, n_steps: int, tokens_per_step: int, window: int = 8) -> tuple[float, float, float]:
    """Time n_steps calls of step() -> (best-window tokens/s, whole-run tokens/s, tokens per
    CPU-second of this process). The first call is a warm-up."""
    step()
    times = []
    cpu = time.process_time()
    for _ in range(n_steps - 1):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu
    total = tokens_per_step * len(times)
    return best_window(times, tokens_per_step, window), total / sum(times), total / max(cpu, 1e-9)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ------------------------------------------------------------------ roofline
def copy_bandwidth(mb: int = 256) -> float:
    """Bytes moved per second (read + write) by a large tensor copy, best of 5 after a warm-up."""
    a = torch.ones(mb * 2**20 // 4)
    b = torch.zeros_like(a)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


def weight_bytes_per_step(model, B: int) -> float:
    """Bytes of weights one decode step of B tokens reads: every dense matrix once, B embedding
    rows, and the routed experts the batch is expected to touch under uniform routing,
    E (1 - (1 - K/E)^B) of E."""
    cfg = model.config
    total = 0
    for name, p in model.state_dict().items():   # parameters and quantized matrices with their scales
        if name.startswith("embed_tokens"):
            total += B * p.shape[1] * p.element_size()
        elif ".experts." in name and "shared" not in name:
            E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
            total += p.numel() * p.element_size() * (1 - (1 - K / E) ** B)
        else:
            total += p.numel() * p.element_size()
    return total


# ------------------------------------------------------------------ the machine
def cpu_name() -> str:
    """The CPU a figure came from: its model name, the units that decide bf16 speed here
    (AVX-512, AVX512-BF16, AMX), and the CPU count."""
    name, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name == "unknown CPU":
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    units = [u for u, flag in (("avx512", "avx512f"), ("avx512_bf16", "avx512_bf16")) if flag in flags] \
        or (["avx2"] if "avx2" in flags else ["no avx2"])
    units.append("AMX" if "amx_tile" in flags else "no AMX")
    return f"{name} ({', '.join(units)}), {os.cpu_count()} CPUs"


# ------------------------------------------------------------------ child processes
def run_child(target: str, spec: dict) -> dict:
    """`python -m target --child SPEC` (or `python target.py --child SPEC` for a script) in a fresh
    process, so its peak memory and allocator are its own; it prints one `RESULT {json}` line."""
    cmd = [sys.executable, target] if target.endswith(".py") else [sys.executable, "-m", target]
    proc = subprocess.run([*cmd, "--child", json.dumps(spec)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{Path(target).name} child {json.dumps(spec)} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def report(result: dict) -> None:
    """What a child prints for run_child, with its peak resident memory."""
    import resource
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)
