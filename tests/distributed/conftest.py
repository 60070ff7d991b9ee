"""Helpers for multi-process tests: a free-port torchrun with a hard timeout, and a tiny token dataset.

Every distributed test starts its processes through `torchrun(...)`: `--standalone` makes
torchrun pick a free port on this machine, the whole process group runs in its own session
and is killed (all of it) when the timeout passes, so a hang fails the test instead of CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    return env


def run_cmd(cmd: list[str], timeout: float = 120.0) -> str:
    """Run a command (which may start several processes) in its own session; kill all of it on timeout."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # torchrun and every worker it started
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout:.0f}s (hang?):\n{out[-4000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}")
    return out


def torchrun(nproc: int, args: list[str], timeout: float = 120.0) -> str:
    """`args` (a script path, or `-m module ...`) on `nproc` processes, on a free port."""
    return run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args],
                   timeout)


def write_token_data(path: Path, vocab: int = 512, train_tokens: int = 8192, val_tokens: int = 1024,
                     seed: int = 0) -> Path:
    """A dataset directory the TokenLoader reads (card.json + uint16 shards) of random token ids."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        f = f"{split}_000.bin"
        rng.integers(2, vocab, n, dtype=np.uint16).tofile(path / f)
        shards[split] = [{"file": f, "tokens": n}]
    card = {"documents": {"train": 1, "val": 1}, "tokens": {"train": train_tokens, "val": val_tokens},
            "vocab_size": vocab, "dtype": "uint16", "bos_id": 0, "eos_id": 1, "tokenizer": None,
            "shards": shards, "unigram_val_loss": float(np.log(vocab - 2)), "skipped": []}
    (path / "card.json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="session")
def token_data(tmp_path_factory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("dist_data"))
