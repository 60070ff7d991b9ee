"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, resume, reshard, export.

Each rank writes only its own shards; DCP's metadata records every tensor's global shape
and where each piece lives, so a checkpoint written by 4 processes (EP 2 x DP 2) loads
into 2 processes, into 1 plain process, or into any other layout: each rank reads the
pieces it now needs. Keys are the plain model's parameter names (parallelize() inserts no
wrapper modules) and optimizer state is keyed by the same names, so the same directory
also exports to the Hugging Face format.

`DCPCheckpointer` implements the trainer's Checkpointer protocol (dsv2.train.checkpoint):

    <root>/step_00000100/.metadata, __<rank>_0.distcp   model + optimizer (sharded), rng
    <root>/step_00000100/state.json                      trainer step/tokens, data position
                                                         (layout-free: global, not per rank)

written into `.tmp_step_*` and renamed by rank 0 after every rank finished, so a crash
never leaves a half-written step under a real name. The data loader's per-rank cursor is
stored as the global window position, which is what lets a different number of ranks
continue on exactly the next windows.

    dsv2 export runs/x/checkpoints runs/x/hf          # the newest step, from any layout, one process
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from ..train.checkpoint import publish_step

_STEP = re.compile(r"^step_(\d+)$")
SHARDED = ("model", "optim")        # go through DCP, resharded on load
LAYOUT_FREE = ("trainer", "data")   # small, global: JSON written by rank 0


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _world() -> int:
    return dist.get_world_size() if _dist() else 1


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _is_ckpt(p: Path) -> bool:
    return bool(_STEP.match(p.name)) and (p / ".metadata").exists()


def _model_optim_state(model: nn.Module, optim) -> dict:
    if optim is None:
        return {"model": get_model_state_dict(model)}
    m, o = get_state_dict(model, optim)
    return {"model": m, "optim": o}


class DCPCheckpointer:
    """Checkpointer protocol over DCP: save(step, state, meta), latest(), load(path, state)."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 3, reseed=None):
        """reseed(step): called on load instead of restoring the saved RNG state, which is one
        rank's (DCP keeps one copy of an unsharded tensor); see mesh.seed_rank."""
        self.root = Path(root)
        self.keep_last = keep_last
        self.reseed = reseed

    def _steps(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.glob("step_*") if _is_ckpt(p)), key=lambda p: int(p.name[5:]))

    def latest(self) -> Path | None:
        steps = self._steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict, meta: dict | None = None) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        sd = _model_optim_state(state["model"], state.get("optim"))
        if "rng" in state:
            sd["rng"] = {k: v for k, v in state["rng"].state_dict().items() if isinstance(v, torch.Tensor)}
        dcp.save(sd, checkpoint_id=str(tmp), no_dist=not _dist())
        free = {k: _to_global(k, state[k].state_dict()) for k in LAYOUT_FREE if k in state}
        _barrier()
        if _rank() == 0:
            (tmp / "state.json").write_text(json.dumps({**free, "meta": {"step": step, "world": _world(), **(meta or {})}},
                                                       indent=1, default=str) + "\n")
            publish_step(tmp, final, self._steps, self.keep_last)
        _barrier()
        return final

    def load(self, path: str | os.PathLike, state: dict) -> None:
        path = Path(path)
        if not _is_ckpt(path):
            raise FileNotFoundError(f"no DCP checkpoint at {path} (a step_* directory with .metadata): "
                                    "give one, or use --resume auto.")
        sd = _model_optim_state(state["model"], state.get("optim"))
        rng = state.get("rng") if self.reseed is None else None
        if rng is not None:
            sd["rng"] = {k: v for k, v in rng.state_dict().items() if isinstance(v, torch.Tensor)}
        dcp.load(sd, checkpoint_id=str(path), no_dist=not _dist())
        if "optim" in sd:
            set_state_dict(state["model"], state["optim"], model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        else:
            set_model_state_dict(state["model"], sd["model"])
        if rng is not None:
            rng.load_state_dict({**rng.state_dict(), **sd["rng"]})
        saved = json.loads((path / "state.json").read_text())
        if self.reseed is not None:
            self.reseed(int(saved["meta"]["step"]))
        for k in LAYOUT_FREE:
            if k in state and k in saved:
                state[k].load_state_dict(_to_local(k, saved[k], state[k].state_dict()))


def _to_global(kind: str, sd: dict) -> dict:
    """A rank's view -> the layout-free view stored on disk."""
    sd = dict(sd)
    if kind == "data" and "cursor" in sd:   # rank r of R reads windows cursor*R + r: R ranks share one position
        sd["position"] = sd.pop("cursor") * sd.pop("dp_size", 1)
    if kind == "trainer" and "tokens" in sd:
        sd["tokens"] = sd["tokens"] * _world()
    return sd


def _to_local(kind: str, sd: dict, current: dict) -> dict:
    """The stored layout-free view -> what this rank's object loads (checked against its layout)."""
    sd = dict(sd)
    if kind == "data" and "position" in sd:
        dp = current.get("dp_size", 1)
        pos = sd.pop("position")
        if pos % dp:
            raise ValueError(f"the checkpoint's data position ({pos} windows) does not split over {dp} ranks: "
                             f"resume with a number of processes dividing {pos}.")
        sd["cursor"], sd["dp_size"] = pos // dp, dp
    if kind == "trainer" and "tokens" in sd:
        sd["tokens"] = sd["tokens"] // _world()
    return sd


def save_model(root: str | os.PathLike, model: nn.Module, optimizer=None, step: int = 0) -> Path:
    """Model (and optimizer) only: a DCP step directory under `root`."""
    return DCPCheckpointer(root, keep_last=0).save(step, {"model": model, **({"optim": optimizer} if optimizer else {})})


def load_model(path: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Load a step directory, or the newest under a root, into any layout of `model`."""
    path = Path(path)
    if not _is_ckpt(path):
        path = DCPCheckpointer(path).latest() or path
    DCPCheckpointer(path.parent).load(path, {"model": model, **({"optim": optimizer} if optimizer else {})})


def export_hf(path: str | os.PathLike, cfg, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
              tokenizer_dir: str | None = None) -> Path:
    """Write a DCP checkpoint (from any layout) as a Hugging Face directory. Runs in one process."""
    from ..checkpoint import save_pretrained
    from ..model import DeepseekV2
    model = DeepseekV2(cfg)
    load_model(path, model)
    if dtype is not None:
        model.to(dtype)
    save_pretrained(model, out_dir, tokenizer_dir=tokenizer_dir)
    return Path(out_dir)
