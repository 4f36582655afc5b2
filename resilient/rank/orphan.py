"""Ranks never outlive their supervisor.

PR_SET_PDEATHSIG makes the kernel SIGKILL the rank when the thread that forked it exits
(the supervisor spawns from its main thread). The signal is only armed from the moment of
the prctl call, so a supervisor that died between fork and here is caught by comparing
getppid() with the pid the supervisor announced.
"""

from __future__ import annotations

import ctypes
import os
import signal

from resilient.rank.env import RankEnv

_PR_SET_PDEATHSIG = 1


def arm_parent_death_signal() -> None:
    """Have the kernel SIGKILL this process when the thread that started it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def die_with_parent(env: RankEnv | None = None) -> bool:
    """Arm parent-death SIGKILL when supervised; returns whether it was armed (False: unsupervised)."""
    expected = (env or RankEnv.from_environ()).supervisor_pid
    if expected is None:
        return False
    arm_parent_death_signal()
    if os.getppid() != expected:
        os.kill(os.getpid(), signal.SIGKILL)  # the supervisor is already gone
    return True
