"""One trainer per run folder: a lock file `out_dir/.lock` holding the owner's PID.

Two trainers writing the same `out_dir` (a forgotten background run, a second terminal)
interleave their `metrics.jsonl` lines and race on checkpoints. The lock is an advisory
`flock` on the file, so the kernel releases it when its holder dies, however it dies; the
PID written inside is only for the message. A lock file left by a dead process is
therefore taken over, with a notice naming the dead PID.

    with RunLock("runs/tiny"):
        Trainer(cfg).fit()
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path


class RunLockedError(ValueError):
    """Another live process holds the run folder."""


class RunLock:
    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            pid = holder[0] if holder else "unknown"
            raise RunLockedError(
                f"{self.path.parent} is in use by another trainer (PID {pid}"
                f"{' on ' + holder[1] if len(holder) > 1 else ''}): stop that process, or choose another "
                "out_dir=.") from None
        previous = os.read(fd, 200).decode(errors="replace").split()
        if previous and previous[0] != str(os.getpid()):
            # flock was free, so whoever wrote this PID no longer holds the folder.
            print(f"note: {self.path} was left by PID {previous[0]}, which is no longer running; taking it over",
                  file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)   # an empty lock file reads as "nobody", not as a stale PID
            os.close(self.fd)          # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
