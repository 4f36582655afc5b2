"""One run per run directory: an exclusive flock on RUN_DIR/.lock, held by node 0's supervisor for
the life of the run (the kernel drops it when the process dies, so a crash never leaves it stale)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from resilient.core.errors import ConfigError, RunDirBusy
from resilient.core.rundir import RunDir


class RunLock:
    """A held lock; `release()` (or process exit) frees it."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = -1


def make_run_dir(root: Path) -> None:
    """Create RUN_DIR (owner-only) or say in one line why it cannot be."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"run dir {root} exists and is not a directory") from None
    except OSError as err:
        raise ConfigError(f"run dir {root}: cannot create it ({err.strerror or err})") from None


def acquire(root: Path, run_id: str | None = None) -> RunLock:
    """Take RUN_DIR's lock without waiting; RunDirBusy names the holder. Nothing else in RUN_DIR is touched."""
    root = Path(root)
    make_run_dir(root)
    path = RunDir(root).lock
    try:
        # O_CLOEXEC: ranks and other children never inherit (and so never prolong) the lock.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except IsADirectoryError:
        raise RunDirBusy(f"{path} is a directory; remove it to use {root}") from None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ConfigError(f"{path} is a symbolic link; refusing to follow it (remove it to use {root})") from None
        raise ConfigError(f"run dir {root}: cannot write its lock file ({err.strerror or err})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirBusy(f"{root} is in use by {holder(root)}; one run per run dir") from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "run_id": run_id or f"local-{os.getpid()}",
        "since": time.time(),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError:
        pass  # the flock is what protects the run; the record only names the holder
    return RunLock(fd, path)


def holder(root: Path) -> str:
    """Who holds RUN_DIR's lock, as recorded in it ("another process" when unreadable)."""
    try:
        info = json.loads(RunDir(root).lock.read_text())
        return f"pid {info['pid']} on {info['host']} (run {info['run_id']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
