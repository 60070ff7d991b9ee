"""Metrics: one JSON object per line (units in the key names), and the one-line step report.

Records have a `kind`: "train" (every log_every steps; losses are means over those steps), "val" (every eval_every), "load"
(tokens per expert per layer, every moe.load_every). `dsv2 plot` reads them back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s of accelerators we know, for MFU. CPUs vary too much to guess.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "RTX 4090": 165e12}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in PEAK_FLOPS.items():
            if key in name:
                return flops
    return None


class MetricsWriter:
    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a" if append else "w", buffering=1)

    def write(self, kind: str, **record) -> None:
        self.f.write(json.dumps({"kind": kind, "time_s": round(time.time(), 3), **record}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop records from steps after the checkpoint, so the file reads as one run.

        The rewrite goes through a temporary file and a rename: a crash mid-rewrite keeps the
        old file whole."""
        self.f.close()
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)
        self.f = open(self.path, "a", buffering=1)

    def close(self) -> None:
        self.f.close()


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics file; a line that is not JSON (a torn write, two writers) is
    reported on stderr with its number and skipped, so one bad line never blocks a resume."""
    records = []
    for i, ln in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            records.append(json.loads(ln))
        except ValueError:
            print(f"warning: {path} line {i} is not a JSON record ({ln[:40]!r}...); skipping it", file=sys.stderr)
    return records


def _duration(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def step_line(step: int, total: int, loss: float, aux: dict[str, float], drop_rate: float | None, lr: float,
              tok_s: float, mfu: float | None, eta_s: float) -> str:
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)", f"loss {loss:.4f}"]
    if aux:
        parts.append(" ".join(f"{k} {v:.4f}" for k, v in aux.items()))
    if drop_rate is not None:
        parts.append(f"drop {100 * drop_rate:.1f}%")
    parts += [f"lr {lr:.2e}", f"{tok_s / 1e3:.1f}k tok/s"]
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)
