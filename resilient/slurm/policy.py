"""What the batch job does when its supervisors have exited: requeue, requeue without a node, or stop.

Pure functions of the exit codes and the run's ledger; the batch script acts on the decision
through `resilient slurm on-exit` (resilient/slurm/on_exit.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from resilient.core.exit_codes import ExitCode
from resilient.slurm.config import SlurmConfig

_CANNOT_HELP = {
    ExitCode.CONFIG_ERROR: "configuration error",
    ExitCode.CHECKPOINT_DAMAGED: "no loadable checkpoint",
    ExitCode.RESTART_BUDGET_EXHAUSTED: "in-job restart budget exhausted",
    ExitCode.NO_PROGRESS: "no progress over several attempts",
    ExitCode.STORAGE_FAULT: "checkpoint storage full or failing (free space, then resubmit)",
    ExitCode.RUN_DIR_BUSY: "another run holds the run directory",
}


class Action(StrEnum):
    REQUEUE = "requeue"
    FINISHED = "finished"
    STOP = "stop"


class Cause(StrEnum):
    """Why the job was requeued; crash requeues are counted against slurm.max_crash_requeues."""

    PREEMPTED = "preempted"
    UNHEALTHY = "unhealthy_node"
    CRASH = "crash"


@dataclass(frozen=True)
class GaveUp:
    """A supervisor's `gave_up` ledger record."""

    exit_code: int
    node: str | None
    reason: str
    epoch: int = 0
    """The coordinator's epoch (elections) that decided it."""


@dataclass(frozen=True)
class JobEnd:
    """What is known when the supervisors of one allocation have exited."""

    exit_code: int
    """srun's exit code: the highest of the supervisors' codes (128+n for a signal)."""
    gave_up: tuple[GaveUp, ...]
    """`gave_up` records written during this allocation."""
    nodes: int
    """Nodes of this allocation."""
    crash_requeues: int
    """Earlier requeues of this run caused by crashes."""
    fatal_nodes: tuple[str, ...] = ()
    """Nodes with a fatal `health` record during this allocation."""
    straggler_nodes: tuple[str, ...] = ()
    """Nodes with a `straggler` record during this allocation."""
    spares: int = 0
    """Spare nodes among `nodes` (slurm.spare_nodes)."""
    outcome_code: int | None = None
    """The exit code of the coordinator's final decision in this allocation (`finished`, `preempted`, `gave_up`;
    the newest epoch's), when one was recorded: it is the run's, whatever srun reports for a fenced or
    replaced node's supervisor."""
    unhealthy_nodes: tuple[str, ...] = ()
    """Nodes the bad-node ledger took out as unhealthy during this allocation (a spare replaced them)."""
    repeat_bad_nodes: tuple[str, ...] = ()
    """Nodes the bad-node ledger took out at least twice over the whole run: never taken back."""
    cancelled: bool = False
    """Slurm says the job was cancelled (`scancel`): its SIGTERM reached the supervisors as a stop request,
    but the operator meant the run to end."""


@dataclass(frozen=True)
class RequeueDecision:
    action: Action
    cause: Cause | None = None
    exclude: tuple[str, ...] = ()
    """Nodes to add to the job's excluded nodes before it runs again."""
    drain: tuple[str, ...] = ()
    """Nodes to drain (operator's choice: slurm.drain_bad_nodes)."""
    nodes: int | None = None
    """New node count for the requeued job, spares included (None: unchanged)."""
    spares: int | None = None
    """New spare-node count for the requeued job (None: unchanged)."""


def _known(code: int) -> ExitCode | None:
    try:
        return ExitCode(code)
    except ValueError:
        return None


def _requeue(
    cause: Cause, reason: str, end: JobEnd, cfg: SlurmConfig, bad: tuple[str, ...], stragglers: tuple[str, ...]
) -> tuple[RequeueDecision, str]:
    exclude = tuple(sorted({*bad, *stragglers, *end.repeat_bad_nodes}))
    if stragglers:
        reason += f"; straggler node(s) {', '.join(stragglers)} excluded"
    if set(end.repeat_bad_nodes) - set(bad):
        reason += f"; node(s) {', '.join(sorted(set(end.repeat_bad_nodes) - set(bad)))} failed twice: never taken back"
    # A smaller allocation gives up spares first, then training nodes down to slurm.min_nodes.
    train = end.nodes - end.spares
    request = max(cfg.min_nodes or train, end.nodes - len(exclude))
    new_train = min(train, request)
    spares = request - new_train
    if request != end.nodes:
        reason += f"; {request} node(s) from now on" + (f" ({spares} spare)" if end.spares else "")
    drain = _drain(end, cfg, bad)
    return RequeueDecision(
        Action.REQUEUE,
        cause,
        exclude,
        drain,
        request if request != end.nodes else None,
        spares if spares != end.spares else None,
    ), reason


def _drain(end: JobEnd, cfg: SlurmConfig, bad: Iterable[str] = ()) -> tuple[str, ...]:
    """Nodes to drain (slurm.drain_bad_nodes): those found unhealthy, also when a spare took their place."""
    return tuple(sorted({*bad, *end.unhealthy_nodes})) if cfg.drain_bad_nodes else ()


def decide_requeue(end: JobEnd, cfg: SlurmConfig, *, exclude_stragglers: bool = False) -> tuple[RequeueDecision, str]:
    """The action for a finished allocation and a one-line reason.

    The coordinator's final decision, when recorded, is the run's code (srun's maximum also counts a
    fenced or replaced node's supervisor); every `gave_up` code counts too, and the most final one wins:
    a condition a requeue cannot fix, then a bad node, then preemption, then success. The bad
    node is the one named by an UNHEALTHY_NODE `gave_up` record, else the one with a fatal
    `health` record; nodes a spare replaced as unhealthy and nodes out twice are excluded on any
    requeue, and drained (slurm.drain_bad_nodes) whatever the action. Persistent stragglers are excluded
    too when health.straggler_action says so.
    """
    run_code = end.exit_code if end.outcome_code is None else end.outcome_code
    codes = {run_code, *(g.exit_code for g in end.gave_up)}
    if end.cancelled and codes != {ExitCode.FINISHED}:
        return RequeueDecision(Action.STOP, drain=_drain(end, cfg)), "cancelled (scancel): not requeued"
    for code, what in _CANNOT_HELP.items():
        if code in codes:
            detail = next((g.reason for g in end.gave_up if g.exit_code == code and g.reason), "")
            why = f"{what} (exit {int(code)}){': ' + detail if detail else ''}; not requeued"
            return RequeueDecision(Action.STOP, drain=_drain(end, cfg)), why

    stragglers = tuple(sorted(set(end.straggler_nodes))) if exclude_stragglers else ()
    replaced = tuple(sorted(set(end.unhealthy_nodes)))  # unhealthy nodes a spare replaced: not taken back
    if ExitCode.UNHEALTHY_NODE in codes:
        bad = tuple(sorted({g.node for g in end.gave_up if g.exit_code == ExitCode.UNHEALTHY_NODE and g.node}))
        bad = bad or tuple(sorted(set(end.fatal_nodes)))
        if bad:
            reason = f"unhealthy node {', '.join(bad)}: requeued without it"
            return _requeue(Cause.UNHEALTHY, reason, end, cfg, tuple(sorted({*bad, *replaced})), stragglers)

    if ExitCode.PREEMPTED in codes:
        return _requeue(Cause.PREEMPTED, "preempted after saving: requeued", end, cfg, replaced, stragglers)
    if codes == {ExitCode.FINISHED}:
        finished = "run finished" + (f" (replaced in-job: {', '.join(replaced)})" if replaced else "")
        return RequeueDecision(Action.FINISHED, drain=_drain(end, cfg)), finished

    unknown = max(codes - {ExitCode.FINISHED})
    named = _known(unknown)
    what = f"exit {unknown}" + (f" ({named.name})" if named else " (signal)" if unknown > 128 else "")
    if ExitCode.UNHEALTHY_NODE in codes:
        what += ", unhealthy node not named in the ledger"
    if end.crash_requeues >= cfg.max_crash_requeues:
        return RequeueDecision(Action.STOP, drain=_drain(end, cfg)), (
            f"supervisors failed ({what}) after {end.crash_requeues} crash requeue(s) "
            f"(slurm.max_crash_requeues={cfg.max_crash_requeues}); not requeued"
        )
    reason = (
        f"supervisors failed ({what}): requeued, crash requeue {end.crash_requeues + 1} of {cfg.max_crash_requeues}"
    )
    return _requeue(Cause.CRASH, reason, end, cfg, replaced, stragglers)


_OUTCOME_CODES = {"finished": int(ExitCode.FINISHED), "preempted": int(ExitCode.PREEMPTED)}


def job_end_from_ledger(
    records: Iterable[Mapping[str, Any]], *, exit_code: int, since: float, nodes: int, spares: int = 0
) -> JobEnd:
    """Collect this allocation's records (written at or after `since`), the run's crash requeues and the
    nodes the bad-node ledger took out twice or more."""
    gave_up: list[GaveUp] = []
    fatal: list[str] = []
    stragglers: list[str] = []
    unhealthy: list[str] = []
    outs: dict[str, int] = {}
    final: tuple[int, int] | None = None  # (epoch, code) of the newest coordinator's final decision
    crashes = 0
    for r in records:
        event, node, current = r.get("event"), r.get("node"), float(r.get("ts", 0)) >= since
        if event == "requeue" and r.get("cause") == Cause.CRASH:
            crashes += 1
        if event == "bad_node" and isinstance(node, str) and node:
            outs[node] = outs.get(node, 0) + 1
            if current and r.get("kind") == "unhealthy":
                unhealthy.append(node)
        if current and isinstance(node, str) and node:
            if event == "health" and r.get("severity") == "fatal":
                fatal.append(node)
            elif event == "straggler":
                stragglers.append(node)
        code: Any = None
        if event == "gave_up" and current:
            try:
                code = int(r["exit_code"])
            except (KeyError, TypeError, ValueError):
                continue
            gave_up.append(GaveUp(code, r.get("node"), str(r.get("reason") or ""), int(r.get("epoch") or 0)))
        elif event in _OUTCOME_CODES and current:
            code = _OUTCOME_CODES[str(event)]
        if code is not None and "epoch" in r:
            epoch = int(r.get("epoch") or 0)
            if final is None or epoch >= final[0]:
                final = (epoch, code)
    if final is not None:  # a decision of a coordinator that was succeeded by an election no longer counts
        gave_up = [g for g in gave_up if g.epoch >= final[0]]
    return JobEnd(
        exit_code=exit_code,
        gave_up=tuple(gave_up),
        nodes=nodes,
        crash_requeues=crashes,
        fatal_nodes=tuple(fatal),
        straggler_nodes=tuple(stragglers),
        spares=spares,
        outcome_code=None if final is None else final[1],
        unhealthy_nodes=tuple(unhealthy),
        repeat_bad_nodes=tuple(sorted(n for n, count in outs.items() if count >= 2)),
    )


def unrecorded_requeue(
    records: Iterable[Mapping[str, Any]], restart_count: int, job_id: str | None
) -> dict[str, Any] | None:
    """The `requeue` record of an allocation that Slurm requeued itself, found at the next allocation's start:
    its batch host was lost (NODE_FAIL), so `slurm on-exit` never ran and nothing recorded why. None when the
    previous allocation of this job ended through `slurm on-exit` (or there was none)."""
    if restart_count <= 0:
        return None
    records = list(records)
    previous = [
        r
        for r in records
        if r.get("event") == "run_start"
        and r.get("slurm_job_id") == job_id
        and r.get("slurm_restart_count") == restart_count - 1
    ]
    if not previous:
        return None
    since = min(float(r.get("ts", 0)) for r in previous)
    if any(r.get("event") in ("requeue", "job_end") and float(r.get("ts", 0)) >= since for r in records):
        return None
    batch_host = next((r.get("host") for r in previous if r.get("slot") == 0), None)
    out = [str(r.get("node")) for r in records if r.get("event") == "bad_node" and float(r.get("ts", 0)) >= since]
    reason = (
        f"Slurm requeued the job itself: the allocation ended without `slurm on-exit` (its batch host "
        f"{batch_host or '?'} lost, NODE_FAIL)" + (f"; nodes out before: {', '.join(out)}" if out else "")
    )
    return {
        "job_id": job_id,
        "cause": "slurm",
        "exclude": [],
        "reason": reason,
        "lost_batch_host": batch_host,
        "slurm_restart_count": restart_count - 1,
    }


def job_ref(env: Mapping[str, str]) -> str:
    """The ID scontrol acts on: `ARRAYJOBID_TASKID` for an array task, as Slurm names array tasks
    (requeueing SLURM_ARRAY_JOB_ID alone would hit the whole array), else SLURM_JOB_ID."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]
