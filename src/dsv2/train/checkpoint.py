"""Training checkpoints: everything needed to resume exactly, written atomically, last k kept.

The trainer hands a checkpointer a dict of Stateful objects (each has `state_dict()` and
`load_state_dict()`): model, optim, trainer (step, tokens), data (loader position), rng.
That is the shape `torch.distributed.checkpoint` saves and loads, so a DCP-backed
checkpointer can replace `LocalCheckpointer` without touching the loop (see
`dsv2.train.__doc__`, point 4).

`LocalCheckpointer` writes `<root>/step_00000100/state.pt` (+ `meta.json` for humans) into a
temporary directory first and renames it into place: a crash mid-write leaves the previous
checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, sd: dict) -> None: ...


class Checkpointer(Protocol):
    def save(self, step: int, state: dict[str, Stateful], meta: dict | None = None) -> Path: ...
    def latest(self) -> Path | None: ...
    def load(self, path: str | Path, state: dict[str, Stateful]) -> None: ...


class RNGState:
    """torch (CPU and, when present, CUDA) and Python RNG states as one Stateful."""

    def state_dict(self) -> dict:
        sd = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if torch.cuda.is_available():
            sd["cuda"] = torch.cuda.get_rng_state_all()
        return sd

    def load_state_dict(self, sd: dict) -> None:
        torch.set_rng_state(sd["torch"])
        random.setstate((3, tuple(sd["python"]), None))
        if "cuda" in sd and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(sd["cuda"])


def publish_step(tmp: Path, final: Path, steps, keep_last: int) -> None:
    """Move a fully written `tmp` step directory to `final`, then keep only the last `keep_last`
    step directories listed by `steps()` (oldest first, including `final`). Re-saving a step (e.g. after a resume) swaps
    the directories, so there is never a moment with no copy."""
    if final.exists():
        old = final.with_name(f".old_{final.name}_{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    for d in (steps()[: -keep_last] if keep_last > 0 else []):
        shutil.rmtree(d, ignore_errors=True)


class LocalCheckpointer:
    def __init__(self, root: str | Path, keep_last: int = 3):
        self.root = Path(root)
        self.keep_last = keep_last

    def _steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        dirs = [d for d in self.root.glob("step_*") if (d / "state.pt").exists()]
        return sorted(dirs, key=lambda d: int(d.name.split("_")[1]))

    def latest(self) -> Path | None:
        steps = self._steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Stateful], meta: dict | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}_{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save({k: v.state_dict() for k, v in state.items()}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **(meta or {})}, indent=2, default=str) + "\n")
        publish_step(tmp, final, self._steps, self.keep_last)
        return final

    def load(self, path: str | Path, state: dict[str, Stateful]) -> None:
        path = Path(path)
        file = path / "state.pt" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no checkpoint at {path}: give a step_* directory or use --resume auto.")
        sd: dict[str, Any] = torch.load(file, map_location="cpu", weights_only=True)
        missing = [k for k in state if k not in sd]
        if missing:
            raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by `dsv2 pretrain`.")
        for k, obj in state.items():
            obj.load_state_dict(sd[k])
