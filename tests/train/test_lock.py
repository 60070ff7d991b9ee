"""One trainer per run folder: a second `dsv2 pretrain` is refused with the holder's PID; a dead holder's lock is taken over."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsv2.cli import main
from dsv2.train.lock import RunLock, RunLockedError

HOLD = "import sys, time; from dsv2.train.lock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def test_a_second_pretrain_on_a_locked_folder_is_refused(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(["pretrain", "--config", "tiny", f"out_dir={tmp_path}", "data.dir=/nonexistent", "steps=1"])
        err = capsys.readouterr().err
        assert rc == 2 and f"in use by another trainer (PID {holder.pid}" in err and "out_dir=" in err
        assert (tmp_path / ".lock").read_text().split()[0] == str(holder.pid)    # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()
    # once the holder is gone the folder is free again: the same command gets past the lock
    rc = main(["pretrain", "--config", "tiny", f"out_dir={tmp_path}", "data.dir=/nonexistent", "steps=1"])
    err = capsys.readouterr().err
    assert rc == 2 and "in use" not in err and "/nonexistent" in err


def test_a_stale_lock_is_detected_and_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid} somehost\n")
    with RunLock(tmp_path) as lock:
        assert f"left by PID {dead.pid}, which is no longer running" in capsys.readouterr().err
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunLockedError):       # flock is per open file: a second acquire in-process is refused too
            RunLock(tmp_path).acquire()
    assert lock.fd is None and (tmp_path / ".lock").read_text() == ""
    with RunLock(tmp_path):                        # released cleanly: no stale notice the next time
        assert "left by PID" not in capsys.readouterr().err


def test_the_launcher_runs_any_trainer_class_holding_the_lock(tmp_path, capsys):
    """dsv2.launch is generic: a trainer class built from the config, fit() under the run folder's lock."""
    import argparse
    import types

    from dsv2.launch import launch
    seen = {}

    class Objective:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def fit(self, resume=None):
            seen["lock"] = (tmp_path / ".lock").read_text().split()[0]
            with pytest.raises(RunLockedError):           # the folder is held while it trains
                RunLock(tmp_path).acquire()
            return {"step": 3, "tokens": 96, "val_loss": 1.5}

    cfg = types.SimpleNamespace(out_dir=str(tmp_path))
    args = argparse.Namespace(nproc=None, ep=1, resume=None)
    assert launch(args, cfg, Objective) == 0
    assert seen["cfg"] is cfg and seen["lock"] == str(os.getpid())
    assert "done: step 3, 96 tokens, val loss 1.5000 nats" in capsys.readouterr().out
    RunLock(tmp_path).acquire().release()                 # released after fit()
