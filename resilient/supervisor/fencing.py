"""Fencing a lost slot: kill its supervisor (its ranks and spares die with it, PR_SET_PDEATHSIG) so that
a node that was only frozen cannot wake up into a run that has moved on.

Under Slurm the kill goes through the job's own step launcher (`srun --overlap` onto that node): it works
while the node's slurmd answers (a frozen supervisor, a hung main loop). A node whose slurmd is gone too
is removed from the job by Slurm itself (`--no-kill`), which kills what is left there. Outside Slurm
nothing is fenced: a woken supervisor finds itself out of the roster and stops on its own.
Runs on a thread: a fence never holds up the restart.
"""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Mapping

TIMEOUT_S = 60.0


def fence_command(env: Mapping[str, str], host: str, pid: int) -> list[str] | None:
    """The command that kills supervisor `pid` on `host` from within the job, or None outside Slurm."""
    job = env.get("SLURM_JOB_ID")
    if not job or pid <= 0:
        return None
    return [
        "srun",
        f"--jobid={job}",
        "--overlap",
        f"--nodelist={host}",
        "--nodes=1",
        "--ntasks=1",
        "--quiet",
        "kill",
        "-KILL",
        str(pid),
    ]


def fence(host: str, pid: int | None, done: Callable[[bool, str], None], env: Mapping[str, str] = os.environ) -> bool:
    """Start fencing `pid` on `host`; `done(ok, detail)` is called from the thread. False: nothing to run."""
    cmd = None if pid is None else fence_command(env, host, pid)
    if cmd is None:
        return False
    clean = {k: v for k, v in env.items() if not k.startswith(("SLURM_STEP", "SLURM_CPU_BIND"))}

    def run() -> None:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=clean, check=False)
            detail = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[-1:]
            done(out.returncode == 0, detail[0] if detail else "")
        except (OSError, subprocess.TimeoutExpired) as err:
            done(False, str(err))

    threading.Thread(target=run, name=f"fence-{host}", daemon=True).start()
    return True
