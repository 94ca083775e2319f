"""One trainer per workdir: an exclusive lock on ``<workdir>/trainer.lock`` for the run's life.

Process 0 takes ``flock(LOCK_EX | LOCK_NB)`` on the file before it touches checkpoints or
metrics and keeps it until the run ends. The kernel releases the lock when the process dies
(kill -9 included), so a crashed run never blocks the next one; the file itself stays, with
the last holder's pid, host and start time, which a refused trainer names.

Local disks and NFSv4 (the Linux client turns ``flock`` into an NFS byte-range lock) honour
it. Object stores (``gs://`` workdirs) have no locks: there the lock is skipped and the user
must not start two runs on one workdir (docs/multihost.md).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

LOCK_FILENAME = "trainer.lock"


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir; the message names its pid and host."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


class WorkdirLock:
    """Context manager holding the workdir's lock (a no-op when ``enabled`` is False or on gs://)."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled and "://" not in workdir
        self._fd: Optional[int] = None

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        path = os.path.join(self.workdir, LOCK_FILENAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise WorkdirLockedError(
                f"--workdir {self.workdir!r} is in use by another trainer ({holder}); wait for it to end or stop "
                f"it, or use another --workdir") from None
        except OSError:  # a file system without locks: run without one, as on gs://
            os.close(fd)
            return self
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None
