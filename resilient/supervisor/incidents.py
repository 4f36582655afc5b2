"""Evidence of a hang or crash, taken before teardown: RUN_DIR/incidents/<attempt>-<kind>/.

Hang: every local rank's Python stack (py-spy, in parallel, each bounded by a timeout; it reads
the process without pausing it, so a stopped rank dumps too), NCCL flight-recorder dumps when
PyTorch is configured to write them, and a summary naming the culprit (incidents_culprit).
Crash: the exit code or signal and the last lines of the rank's log.
Files: rank<N>.txt (stack or log tail), node<N>.json (a hang's per-rank evidence from each node),
summary.json, summary.txt. In a multi-node hang every supervisor adds its ranks (the one that
detected it, and the others when they see its restart request), and each rewrites the summary from
all evidence present, so the culprit may be on any node. Collection never raises: a failure to
gather evidence must not delay or break recovery.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from resilient.core.atomic import atomic_write
from resilient.core.rundir import RunDir
from resilient.supervisor.incidents_culprit import Culprit, RankEvidence, find_culprit
from resilient.supervisor.incidents_stacks import (
    in_collective,
    last_traceback_frame,
    main_stack,
    parse_frame,
    parse_pyspy,
)
from resilient.supervisor.ranks import RankProcess, log_path

HANG_KINDS = ("hang",)
CRASH_KINDS = ("rank_exit", "rank_error")
# A rank that gave up waiting on a peer is a hang its transport found: gloo's and NCCL's watchdog messages
COLLECTIVE_TIMEOUTS = ("Timed out waiting", "Watchdog caught collective operation timeout")
DUMP_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 60
# PyTorch's NCCL flight recorder: ranks write `<TEMP_FILE><rank>`; writing to `<PIPE_FILE><rank>.pipe`
# asks a live rank to dump now (both read by ProcessGroupNCCL from the rank's environment).
NCCL_DUMP_ENV, NCCL_PIPE_ENV = "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_PIPE_FILE"
NCCL_DUMP_WAIT_S = 3.0


@dataclass(frozen=True)
class Target:
    """One local rank as the supervisor sees it at detection time."""

    rank: int
    pid: int
    step: int | None
    log: Path | None
    returncode: int | None


def targets(ranks: Iterable[RankProcess], views: dict[int, Any]) -> list[Target]:
    """Targets from the supervisor's RankProcess list and RankView map."""
    return [
        Target(r.spec.rank, r.pid, getattr(views.get(r.spec.rank), "step", None), log_path(r.spec), r.returncode)
        for r in ranks
    ]


def capture(
    run_dir: Path,
    attempt: int,
    kind: str,
    rank: int | None,
    reason: str,
    ranks: list[Target],
    *,
    node: int = 0,
    peer: bool = False,
) -> str | None:
    """Write the incident for failure `kind` and return its directory relative to the run dir (None if
    the kind has no evidence to take or collecting failed). `peer`: the failure is another node's; only
    a hang (or a rank's collective that timed out waiting for a peer) needs this node's stacks too."""
    waited = kind in CRASH_KINDS and collective_timeout(reason)
    if not (kind in HANG_KINDS or waited or (kind in CRASH_KINDS and not peer)):
        return None
    out = RunDir(run_dir).incidents / f"{attempt}-{kind}"
    rel = str(out.relative_to(run_dir))
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        summary = {"kind": kind, "attempt": attempt, "reason": reason, "failed_rank": rank, "created_at": time.time()}
        if kind in HANG_KINDS:
            summary |= _hang(out, ranks, node)
        elif waited:  # the failed rank waited on another, maybe on another node: every live rank's stack
            summary |= _crash(out, rank, ranks, tail_name=f"rank{rank}.log.txt") | _hang(out, ranks, node)
        else:
            summary |= _crash(out, rank, ranks)
        atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=str), durable=False)
        atomic_write(out / "summary.txt", render_summary(summary), durable=False)
        return rel
    except Exception as err:  # noqa: BLE001 - evidence is best effort; recovery goes on
        print(f"resilient: could not record the {kind} incident: {type(err).__name__}: {err}", file=sys.stderr)
        return None


def collective_timeout(reason: str) -> bool:
    """Whether a rank's error is a collective that timed out waiting for a peer (gloo, NCCL's watchdog)."""
    return any(text in reason for text in COLLECTIVE_TIMEOUTS)


def render_summary(s: dict[str, Any]) -> str:
    c = s.get("culprit") or {}
    lines = [
        f"{s['kind']} in attempt {s['attempt']}: {s['reason']}",
        f"culprit: rank {c.get('rank')} at {c.get('frame') or '?'}",
        f"why: {c.get('reason')}",
        "",
    ]
    if "exit" in s:
        lines.append(f"exit: {s['exit']}")
    for r in s.get("ranks", []):
        lines.append(
            f"rank {r['rank']:>4} node {r.get('node', '-')!s:>3} pid {r['pid']:>7} {r['state']:<12} "
            f"step {r['step']!s:>8} "
            f"{'in collective ' if r.get('in_collective') else ''}{r.get('frame') or ''}"
        )
    return "\n".join(lines) + "\n"


# -- hang ----------------------------------------------------------------------------------------------


def _hang(out: Path, ranks: list[Target], node: int) -> dict[str, Any]:
    live = [t for t in ranks if t.returncode is None]
    states = {t.rank: _process_state(t.pid) for t in live}  # before dumping: what the hang looked like
    triggered = _trigger_nccl_dumps(live)
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(live)))) as pool:
        dumps = dict(zip((t.rank for t in live), pool.map(_pyspy_dump, (t.pid for t in live)), strict=True))
    rows = []
    for t in live:
        (out / f"rank{t.rank}.txt").write_text(dumps[t.rank])
        stack = main_stack(parse_pyspy(dumps[t.rank]))
        rows.append(
            {
                "rank": t.rank,
                "node": node,
                "pid": t.pid,
                "state": states[t.rank],
                "step": t.step,
                "in_collective": in_collective(stack),
                "frame": str(stack[0]) if stack else None,
                "stack": [str(f) for f in stack],
            }
        )
    _copy_nccl_dumps(out, live, triggered)
    atomic_write(out / f"node{node}.json", json.dumps(rows, indent=1), durable=False)
    rows = sorted((r for f in out.glob("node*.json") for r in json.loads(f.read_text())), key=lambda r: r["rank"])
    culprit = find_culprit(
        [
            RankEvidence(r["rank"], r["state"], r["step"], tuple(f for f in map(parse_frame, r["stack"]) if f))
            for r in rows
        ]
    )
    return {
        "culprit": asdict(culprit),
        "ranks": rows,
        "nodes": sorted({r["node"] for r in rows}),
        "nccl_dumps": sorted(p.name for p in out.glob("nccl_trace_rank*")),
    }


def _pyspy() -> str | None:
    # pip puts py-spy beside the interpreter; PATH may not include that directory.
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _pyspy_dump(pid: int) -> str:
    """py-spy's text dump of `pid`, without pausing it; an explanation instead when it cannot be taken."""
    exe = _pyspy()
    if exe is None:
        return "py-spy is not installed (pip install py-spy); no stack taken\n"
    try:
        done = subprocess.run(
            [exe, "dump", "--pid", str(pid), "--nonblocking"],
            capture_output=True,
            text=True,
            timeout=DUMP_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return f"py-spy dump --pid {pid} did not finish within {DUMP_TIMEOUT_S:g}s\n"
    if done.returncode != 0:
        return f"py-spy dump --pid {pid} failed (exit {done.returncode}):\n{done.stderr}"
    return done.stdout


def _process_state(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return "gone"


def _trigger_nccl_dumps(live: list[Target]) -> bool:
    """Ask each live rank's NCCL flight recorder to dump now, where PyTorch listens on a pipe."""
    pipe = os.environ.get(NCCL_PIPE_ENV)
    if not pipe or not os.environ.get(NCCL_DUMP_ENV):
        return False
    asked = False
    for t in live:
        try:  # O_NONBLOCK: ENXIO at once when no rank reads the pipe, instead of blocking the supervisor
            fd = os.open(f"{pipe}{t.rank}.pipe", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            os.write(fd, b"1\n")
            asked = True
        except OSError:
            pass
        finally:
            os.close(fd)
    return asked


def _copy_nccl_dumps(out: Path, live: list[Target], triggered: bool) -> None:
    """Copy `<TORCH_NCCL_DEBUG_INFO_TEMP_FILE><rank>` of each rank into the incident (GPU runs only)."""
    prefix = os.environ.get(NCCL_DUMP_ENV)
    if not prefix:
        return
    deadline = time.monotonic() + (NCCL_DUMP_WAIT_S if triggered else 0.0)
    wanted = {t.rank: Path(f"{prefix}{t.rank}") for t in live}
    while time.monotonic() < deadline and not all(p.exists() for p in wanted.values()):
        time.sleep(0.1)
    for rank, src in wanted.items():
        if src.exists():
            shutil.copyfile(src, out / f"nccl_trace_rank{rank}")


# -- crash ---------------------------------------------------------------------------------------------


def _crash(out: Path, rank: int | None, ranks: list[Target], tail_name: str | None = None) -> dict[str, Any]:
    t = next((t for t in ranks if t.rank == rank), None)
    if t is None:
        return {"culprit": asdict(Culprit(rank, None, "the failed rank is not on this node")), "ranks": []}
    tail = _log_tail(t.log)
    (out / (tail_name or f"rank{t.rank}.txt")).write_text("".join(line + "\n" for line in tail))
    code = t.returncode
    exit_info: dict[str, Any] = {"rank": t.rank, "pid": t.pid, "code": code}
    if code is not None and code < 0:
        exit_info["signal"] = signal.Signals(-code).name
    frame = last_traceback_frame(tail)
    how = (
        f"killed by {exit_info['signal']}"
        if "signal" in exit_info
        else f"exited with code {code}"
        if code is not None
        else "reported an error"
    )
    return {
        "culprit": asdict(Culprit(t.rank, str(frame) if frame else None, f"rank {t.rank} {how}")),
        "exit": exit_info,
        "log": str(t.log) if t.log else None,
        "log_tail_lines": len(tail),
        "ranks": [
            {
                "rank": t.rank,
                "pid": t.pid,
                "state": "exited" if code is not None else "error",
                "step": t.step,
                "frame": str(frame) if frame else None,
            }
        ],
    }


def _log_tail(log: Path | None, max_bytes: int = 65536) -> list[str]:
    if log is None:
        return []
    try:
        # never through a link
        with open(log, "rb", opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW)) as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-LOG_TAIL_LINES:]
