"""Slurm client calls (sbatch, scontrol): the only place that runs them. No shell, bounded time."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from resilient.core import ledger
from resilient.core.errors import ResilientError
from resilient.core.exit_codes import ExitCode

TIMEOUT_S = 60.0
# Job states in which a run's job still holds or waits for an allocation.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
    }
)


class SlurmError(ResilientError):
    """A Slurm command is missing or refused the request (e.g. an unknown partition)."""

    exit_code = ExitCode.CONFIG_ERROR


def _run(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]}: not found (is this a Slurm login node?)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(argv[:2])}: no answer from slurmctld within {TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        message = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[0]
        raise SlurmError(f"{' '.join(argv[:2])}: {message}")
    return done.stdout


def submit(script: Path) -> str:
    """Submit a batch script; returns the job ID."""
    out = _run(["sbatch", "--parsable", str(script)]).strip()
    return out.split(";", 1)[0]  # "ID" or "ID;cluster"


def show_job(job_ref: str) -> dict[str, str]:
    """`scontrol show job` as key/value pairs (one line per job with -o)."""
    fields: dict[str, str] = {}
    for token in _run(["scontrol", "-o", "show", "job", job_ref]).split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def job_state(job_id: str) -> str | None:
    """The job's state (PENDING, RUNNING, COMPLETED, ...), or None if Slurm no longer knows it
    or cannot be asked. For `resilient status`."""
    try:
        return show_job(job_id).get("JobState")
    except SlurmError:
        return None


def _seconds(value: str) -> float | None:
    """Slurm's [days-]hours:minutes:seconds (or minutes:seconds), as seconds."""
    try:
        days, _, rest = value.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
    except ValueError:
        return None
    while len(parts) < 3:
        parts.insert(0, 0)
    return (int(days) if days else 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def cancelled_by_operator(fields: dict[str, str], margin_s: float = 120.0) -> bool:
    """Whether Slurm is ending the job on request (`scancel`): cancelled, or completing well before its time
    limit. Its SIGTERM reached the supervisors as a stop request, so they saved as for a preemption; a
    requeue would bring back a job the operator meant to end."""
    state = fields.get("JobState")
    if state == "CANCELLED":
        return True
    if state != "COMPLETING":
        return False
    run, limit = _seconds(fields.get("RunTime", "")), _seconds(fields.get("TimeLimit", ""))
    return run is not None and limit is not None and run < limit - margin_s


def being_cancelled(job_ref: str) -> bool:
    """`cancelled_by_operator` for a job, as Slurm sees it now (False when it cannot be asked)."""
    try:
        return cancelled_by_operator(show_job(job_ref))
    except SlurmError:
        return False


def requeue(job_ref: str, *, exclude: Sequence[str] = (), nodes: int | None = None) -> None:
    """Requeue a job; with `exclude` or `nodes`, change it before it can start again.

    A running job's excluded nodes cannot be changed, so it is requeued held, updated while
    pending, then released. This terminates the calling batch job: the caller must ignore SIGTERM.
    """
    if not exclude and nodes is None:
        _run(["scontrol", "requeue", job_ref])
        return
    _run(["scontrol", "requeuehold", job_ref])
    try:
        update = ["scontrol", "update", f"JobId={job_ref}"]
        if exclude:
            current = show_job(job_ref).get("ExcNodeList", "(null)")
            merged = [*([] if current == "(null)" else [current]), *exclude]
            update.append(f"ExcNodeList={','.join(merged)}")
        if nodes is not None:
            # The task count was fixed at submission (ntasks-per-node x nodes): change both.
            update += [f"NumNodes={nodes}", f"NumTasks={nodes}"]
        _run(update)
    finally:
        _run(["scontrol", "release", job_ref])


def drain(node: str, reason: str) -> None:
    """Drain a node so no job gets it until an operator resumes it (needs operator rights)."""
    _run(["scontrol", "update", f"NodeName={node}", "State=DRAIN", f"Reason={reason[:200]}"])


def last_job_id(run_dir: Path) -> str | None:
    """The job most recently submitted for this run (it keeps its ID across requeues)."""
    job_id = None
    for record in ledger.read(run_dir):
        if record.get("event") == "submitted":
            job_id = str(record.get("job_id"))
    return job_id
