"""A parked rank: a Python process that imported what a rank needs and waits for its assignment.

    python -m resilient.rank.park [--import MODULE]... [--script PATH]

The supervisor starts it ahead of need (warm standby). It imports the `--import` modules (torch,
megatron.core, the trainer's modules, a script's top-level imports) while a thread waits on stdin,
before any process group exists, for one JSON line: {"environ": {...}, "argv": [...], "log": "..."}.
With the assignment and the imports done, it appends stdout/stderr to the rank log (0600), replaces
its environment with `environ` and runs `argv` in-process: `python -m MODULE ARGS` via
runpy.run_module, `python SCRIPT ARGS` via runpy.run_path, both as `__main__`. Its exit status is the
rank's. End of input without an assignment: exit 0 quietly. It dies with its supervisor
(PR_SET_PDEATHSIG, armed first), whose pid it gets in RESILIENT_SUPERVISOR_PID. Where it may return
to normal priority afterwards, it imports at SCHED_IDLE: a refill never takes CPU from training ranks.

Contract for tools that look at processes from outside: while parked, fd 0 is the assignment pipe;
once assigned it is /dev/null. The initial environment (/proc/PID/environ) carries the identity of
the local rank the spare is kept for (RANK, LOCAL_RANK, RESILIENT_RUN_DIR, ...); attempt and master
port there are placeholders, the assignment sets the real ones.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import sys
import threading
import time
from typing import Any

from resilient.core import beneath, sched
from resilient.core.exit_codes import ExitCode
from resilient.rank.env import ASSIGNED_AT, PARK_READY_FD
from resilient.rank.orphan import die_with_parent

IMPORT_FAILED = "resilient park: warm import"


def idle_until_assigned() -> bool:
    """Import on otherwise idle CPU only (SCHED_IDLE), so that refilling spares never slows the ranks
    training next to them (a 4 s step timeout tripped on 2 cores otherwise). Only where the way back to
    normal priority is allowed (root, CAP_SYS_NICE, RLIMIT_NICE): probed on a throwaway thread first."""
    return sched.idle_is_reversible() and sched.set_idle(0, True)  # threads started from here on inherit it


def normal_priority() -> None:
    """Every thread of this process back to normal scheduling (the spare is a rank now)."""
    for tid in os.listdir("/proc/self/task"):
        sched.set_idle(int(tid), False)


def warm(modules: list[str]) -> list[str]:
    """Import `modules`; returns one line per module that failed (the rank will meet the error itself)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as err:  # noqa: BLE001 - a script's import may exit or raise anything
            failed.append(f"{IMPORT_FAILED} {name}: {type(err).__name__}: {err}")
    return failed


def _redirect(log: str) -> None:
    """stdout and stderr to the rank's log, which the supervisor created: a link in its place is refused."""
    fd = beneath.open_beneath(os.path.dirname(log), os.path.basename(log), flags=os.O_WRONLY | os.O_APPEND)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_assignment(assignment: dict[str, Any]) -> None:
    """Become the rank: log, environment, argv; runs the rank command as `__main__` (SystemExit passes)."""
    argv = [str(a) for a in assignment["argv"]]
    try:
        _redirect(str(assignment["log"]))
    except OSError as err:  # replaced since the supervisor created it: storage trouble, not this rank's crash
        print(f"resilient park: cannot open the rank log {assignment['log']}: {err.strerror or err}", file=sys.stderr)
        sys.exit(int(ExitCode.STORAGE_FAULT))
    assigned = os.environ.get(ASSIGNED_AT) or repr(time.time())
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in assignment["environ"].items()})
    os.environ[ASSIGNED_AT] = assigned  # the rank's start-up counts from its assignment, not from the park
    if len(argv) >= 3 and argv[1] == "-m":
        # sys.path as this spare started it: no working directory (PYTHONSAFEPATH), as the cold rank gets
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(argv[1])
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` does
        runpy.run_path(script, run_name="__main__")


def main() -> int:
    die_with_parent()  # first: a spare never outlives its supervisor
    parser = argparse.ArgumentParser(prog="python -m resilient.rank.park", description=__doc__.splitlines()[0])
    parser.add_argument("--import", dest="modules", action="append", default=[], metavar="MODULE")
    parser.add_argument("--script", help="the rank's script: its directory goes first on sys.path")
    args = parser.parse_args()
    if args.script:
        sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    idle = idle_until_assigned()
    # The assignment is read while the imports run: fd 0 turns /dev/null the moment this process is a
    # rank (what tools outside see), and a spare still importing when it is needed loses no time.
    received: list[bytes] = []
    reader = threading.Thread(target=_receive, args=(received, idle), name="park-assignment", daemon=True)
    reader.start()
    t0 = time.monotonic()
    for line in warm(args.modules):
        print(line, file=sys.stderr, flush=True)
    print(f"resilient park: pid {os.getpid()} warm after {time.monotonic() - t0:.2f}s", file=sys.stderr, flush=True)
    _say_ready()
    reader.join()
    if not received or not received[0].strip():
        return 0
    if args.script:
        sys.path.pop(0)
    run_assignment(json.loads(received[0]))
    return 0


def _say_ready() -> None:
    """Tell the supervisor the imports are done (one byte on the pipe it passed); a supervisor that took
    this spare before that closed its end: nothing to tell then."""
    fd = os.environ.pop(PARK_READY_FD, None)
    if fd is None or not fd.isdigit():
        return
    try:
        os.write(int(fd), b"1")
    except OSError:
        pass
    finally:
        try:
            os.close(int(fd))
        except OSError:
            pass


def _receive(out: list[bytes], idle: bool) -> None:
    """Wait for the assignment line; then normal priority (imports still running finish at full speed),
    stdin becomes /dev/null and the rank's start time is recorded."""
    with os.fdopen(os.dup(0), "rb") as stdin:
        out.append(stdin.readline())
    if idle:
        normal_priority()
    os.environ[ASSIGNED_AT] = repr(time.time())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


if __name__ == "__main__":
    sys.exit(main())
