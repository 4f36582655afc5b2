"""Spawning and stopping one node's rank processes.

Each rank runs in its own process group (teardown reaches its helpers too) and is watched
through a pidfd, so the supervisor's event loop wakes the moment a rank exits.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from resilient.core import beneath
from resilient.core.errors import ConfigError, StorageFault
from resilient.core.rundir import RunDir
from resilient.rank.env import RankEnv

_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND


def log_path(env: RankEnv) -> Path:
    """One log file per rank per attempt."""
    assert env.run_dir is not None
    return RunDir(env.run_dir).logs / f"attempt{env.attempt}.node{env.node_rank}.rank{env.rank}.log"


def open_log(run_dir: Path, path: Path) -> int:
    """An owner-only log below RUN_DIR/logs, opened for appending through directory handles: a link in
    place of the log (or of logs/) is refused, never written through."""
    logs = RunDir(run_dir).logs
    assert path.parent == logs, path
    try:
        return beneath.open_beneath(run_dir, logs.name, path.name, flags=_LOG_FLAGS, make_dirs=True)
    except OSError as err:
        why = "a symbolic link is in its place" if err.errno == errno.ELOOP else (err.strerror or str(err))
        raise StorageFault(f"cannot open the log {path}: {why}; refusing to write through it") from None


def import_path_environ(argv: list[str]) -> dict[str, str]:
    """Python ranks never import from the working directory: `PYTHON -m MODULE` (and `-c`) would put it
    first on sys.path, so PYTHONSAFEPATH keeps it off (the modules come from the installation and
    PYTHONPATH). `PYTHON SCRIPT` puts the script's own directory there instead, which the operator chose."""
    return {"PYTHONSAFEPATH": "1"} if len(argv) >= 2 and argv[1] in ("-m", "-c") else {}


@dataclass
class RankProcess:
    spec: RankEnv
    proc: subprocess.Popen
    pidfd: int
    spawned_at: float
    """time.monotonic() at spawn."""
    returncode: int | None = None
    exited_at: float | None = None
    """time.monotonic() when the exit was noticed."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self, now: float) -> int | None:
        """Reap the rank if it exited; remembers the exit code and when it was noticed."""
        if self.returncode is None:
            code = self.proc.poll()
            if code is not None:
                self.returncode, self.exited_at = code, now
        return self.returncode

    def signal_rank(self, sig: int) -> None:
        """Signal the rank process only (a stop request must not hit its helpers)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def signal_group(self, sig: int) -> None:
        """Signal the rank and everything it started (its process group)."""
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        """Release the pidfd (the event loop must have unregistered it)."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def free_port() -> int:
    """A TCP port free on this host right now: rank 0's process-group store gets a fresh one per attempt,
    so a new attempt never meets the stale keys or lingering sockets of the last."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _thread_defaults(local_ranks: int) -> dict[str, str]:
    """Like torchrun: unless the operator chose, ranks share the cores instead of each taking all of them
    (oversubscribed intra-op threads made CPU steps ~20x slower in bench/recovery)."""
    return {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // local_ranks))}


def rank_environ(spec: RankEnv, argv: list[str]) -> dict[str, str]:
    """The whole environment of rank `spec` running `argv`: the supervisor's, thread defaults, the rank's
    identity, the import path rule."""
    return {
        **_thread_defaults(spec.local_world_size),
        **os.environ,
        **spec.to_environ(),
        "PYTHONUNBUFFERED": "1",
        **import_path_environ(argv),
    }


def spawn(spec: RankEnv, argv: list[str]) -> RankProcess:
    """Start one rank (`argv` as is) with its log file; call from the main thread (PR_SET_PDEATHSIG
    follows the forking thread)."""
    assert spec.run_dir is not None
    fd = open_log(spec.run_dir, log_path(spec))
    try:
        proc = subprocess.Popen(
            argv,
            env=rank_environ(spec, argv),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            process_group=0,
            close_fds=True,
        )
    except OSError as err:
        raise ConfigError(f"supervisor.rank_command: cannot start {argv[0]!r}: {err.strerror}") from None
    finally:
        os.close(fd)
    return RankProcess(spec, proc, os.pidfd_open(proc.pid), time.monotonic())


def stop_all(ranks: list[RankProcess], grace_s: float) -> None:
    """SIGTERM every rank's process group, SIGKILL what is left after `grace_s`, return once all are reaped."""
    for r in ranks:
        if r.poll(time.monotonic()) is None:
            r.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for r in ranks:
        r.signal_group(signal.SIGKILL)  # also reaps helpers left in the group
        r.proc.wait()
        r.poll(time.monotonic())
        r.close()
