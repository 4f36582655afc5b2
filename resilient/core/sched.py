"""CPU scheduling of background work: SCHED_IDLE threads run only on otherwise idle CPU."""

from __future__ import annotations

import os


def set_idle(tid: int, idle: bool) -> bool:
    """SCHED_IDLE for thread `tid` (0: the calling thread), or back to normal; False where not allowed
    (leaving SCHED_IDLE needs root, CAP_SYS_NICE or RLIMIT_NICE)."""
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
        return True
    except OSError:
        return False


def idle_is_reversible() -> bool:
    """Whether a thread of this process may enter SCHED_IDLE and leave it again (root, CAP_SYS_NICE or
    RLIMIT_NICE), probed on a throwaway thread so that the caller's own scheduling never changes."""
    import threading

    ok: list[bool] = []
    probe = threading.Thread(target=lambda: ok.append(set_idle(0, True) and set_idle(0, False)))
    probe.start()
    probe.join()
    return bool(ok and ok[0])
