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

_PR_SET_PDEATHSIG = 1
SUPERVISOR_PID_ENV = "RESILIENT_SUPERVISOR_PID"


def arm_parent_death_signal() -> None:
    """Have the kernel SIGKILL this process when the thread that started it exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def die_with_parent() -> bool:
    """Arm parent-death SIGKILL when supervised; returns whether it was armed (False: unsupervised)."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected:
        return False
    arm_parent_death_signal()
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGKILL)  # the supervisor is already gone
    return True
