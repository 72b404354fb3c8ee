"""One training run per run_dir: an exclusive flock on `run_dir/.lock`, held by rank 0 for the run.

The kernel drops the lock when the holder exits or is killed, so a stale lock cannot block a resume.
The file stays (deleting it would let a second run lock a fresh file while the first holds the old one).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path


class RunLockedError(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by a training run ({holder}). Fix: wait for it to "
                "finish or stop it, or use another train.run_dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
