"""The coordinator's restart decision: one pure function of the nodes' reports and what it knows, with a reason.

`decide_attempt` is the only place that turns an ended attempt into "restart" or "stop with this
outcome"; the supervisor (daemon.py) and the scale simulator (bench/scale) both call it. Nothing here
touches processes, clocks, files or the store: the callers gather the inputs and act on the result.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import tenacity

from resilient.core.exit_codes import ExitCode
from resilient.core.outcome import Outcome, exit_code_for
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.reports import NodeOutcome, NodeReport, StopKind, StopRequest


def made_progress(start_step: int | None, reached_step: int | None) -> tuple[bool, str]:
    """An attempt made progress when it completed a step beyond the step it resumed from."""
    start = start_step or 0
    if reached_step is None:
        return False, f"no step completed after resuming at step {start}"
    if reached_step > start:
        return True, f"reached step {reached_step} from step {start}"
    return False, f"stayed at step {reached_step} (resumed at step {start})"


def backoff_seconds(restart_number: int, cfg: SupervisorConfig) -> float:
    """Wait before restart number `restart_number` (1-based): exponential, capped (tenacity's policy)."""
    wait = tenacity.wait_exponential(multiplier=cfg.backoff_initial_s, max=cfg.backoff_max_s)
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(wait=wait), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, restart_number)
    return float(wait(state))


def final_step_to_check(
    own_trainer: bool, configured: bool | None, train_steps: int, reached_step: int | None, newest_committed: int | None
) -> int | None:
    """The step that must be committed before a run may end "finished", or None where it is not checked.
    The own trainer's final step is `train.steps`; another script's is the step its heartbeats reached.
    `configured` (supervisor.final_save_check) decides; unset, another script is checked only once its
    checkpoints are found in a format the supervisor reads (ours or Megatron-LM's). An exit-only script
    reports no step (docs/rank-protocol.md)."""
    check = configured if configured is not None else (own_trainer or newest_committed is not None)
    if not check:
        return None
    return train_steps if own_trainer else reached_step


def final_step_committed(final_step: int, newest_committed: int | None) -> tuple[bool, str]:
    """A run that reached its final step counts as finished only if that step is in a committed
    checkpoint: saves refused for lack of space would otherwise end "finished" with work unsaved."""
    if newest_committed is not None and newest_committed >= final_step:
        return True, f"final step {final_step} is committed"
    newest = "none" if newest_committed is None else f"step {newest_committed}"
    return False, (
        f"ranks finished step {final_step} but it is not in a committed checkpoint (newest committed: {newest})"
    )


# A rank exiting with one of these found something no restart can change (bad config or data, no
# loadable checkpoint, a checkpoint or run directory gone or replaced): the run ends at once with the
# rank's own code.
_FINAL_RANK_EXITS = {
    int(ExitCode.CONFIG_ERROR): Outcome.CONFIG_ERROR,
    int(ExitCode.CHECKPOINT_DAMAGED): Outcome.CHECKPOINT_DAMAGED,
    int(ExitCode.STORAGE_FAULT): Outcome.STORAGE_FAULT,
}


def rank_exit_is_final(code: int | None) -> bool:
    """Whether a rank's exit code ends the run instead of a restart."""
    return code in _FINAL_RANK_EXITS


def rank_exit_condemns_node(code: int | None) -> bool:
    """Whether a rank's exit code is a fatal verdict on its own node (UNHEALTHY_NODE: e.g. Megatron's rerun
    state machine found the node's results unreproducible): the node reports itself unhealthy."""
    return code == ExitCode.UNHEALTHY_NODE


@dataclass(frozen=True)
class AttemptContext:
    """What the coordinator knows besides the reports when an attempt has ended on every node."""

    nnodes: int
    restarts_done: int
    """In-job restarts already performed."""
    no_progress_streak: int
    """Consecutive ended attempts without progress before this one."""
    train_steps: int
    """The run's final step (`train.steps`): the own trainer's step that must be committed to finish."""
    stop: StopRequest | None = None
    """The job's first stop request, if any."""
    newest_committed: int | None = None
    """The newest committed checkpoint step in the progress directory when the attempt ended."""
    save_on_finish: bool = True
    """`checkpoint.save_on_finish`: the final step is saved, so a finished run must have it committed."""
    lost: Mapping[int, str] = field(default_factory=dict)
    """Node ranks whose supervisor's lease expired (frozen, cut off, dead), with why: at fault at once,
    without waiting for their reports."""
    spares: int = 0
    """Healthy spare nodes with live leases: node faults up to this many are replaced in-job."""


class NodeFaultKind(enum.StrEnum):
    UNHEALTHY = "unhealthy"
    """The node reported a fatal verdict on itself."""
    LOST = "lost"
    """The node's lease expired: its supervisor is frozen, cut off or dead."""
    MISSING = "missing"
    """The node's supervisor holds its lease but did not report in time."""


@dataclass(frozen=True)
class NodeFault:
    """A node the decision holds at fault: no rank of the job can run on it."""

    node: int
    kind: NodeFaultKind
    reason: str


@dataclass(frozen=True)
class AttemptDecision:
    """The coordinator's verdict on an ended attempt: every node restarts (after `backoff_s`) or stops with
    `outcome`."""

    outcome: Outcome | None
    """None: restart."""
    reason: str
    backoff_s: float = 0.0
    reached_step: int | None = None
    """The attempt's highest completed step over all nodes."""
    no_progress_streak: int = 0
    """Consecutive attempts without progress, this one included (the coordinator carries it to the next decision)."""
    faulty_nodes: tuple[NodeFault, ...] = ()
    """Nodes held at fault (unhealthy, lost, then missing; by node): no rank of the job can go on there.
    With enough spares they are replaced (`replace`); otherwise the run ends UNHEALTHY (a node found
    unhealthy: requeued without it) or COORDINATION_LOST (lost or missing: requeued)."""
    replace: bool = False
    """Restart with a spare in the place of every faulty node (same node rank, same placement)."""
    final_step_uncommitted: bool = False
    """The ranks finished but the final step is in no committed checkpoint: a storage fault that no node
    has recorded yet (the coordinator records it)."""

    @property
    def restart(self) -> bool:
        return self.outcome is None

    @property
    def exit_code(self) -> ExitCode | None:
        """The supervisors' exit code when the decision stops the run."""
        return None if self.outcome is None else exit_code_for(self.outcome)[0]


def decide_attempt(reports: Mapping[int, NodeReport], ctx: AttemptContext, cfg: SupervisorConfig) -> AttemptDecision:
    """Restart or stop after an attempt ended, from every node's report (a node without one is lost, when its
    lease expired, else missing). Checked from most to least specific: a rank's final exit, storage (before
    "finished": success is only reported when the final step is committed), finished; faulty nodes that the
    spares cover (unless a stop was requested) are replaced, restarting at once; else an unhealthy node
    stops the run, then preemption, a lost or missing node; then the restart budget and the no-progress
    streak; else restart, with backoff unless the attempt made progress."""
    nodes = sorted(reports)
    starts = [s for n in nodes if (s := reports[n].start_step) is not None]
    reached = max((r for n in nodes if (r := reports[n].reached_step) is not None), default=None)
    progressed, _ = made_progress(min(starts, default=None), reached)
    streak = 0 if progressed else ctx.no_progress_streak + 1
    faults = tuple(NodeFault(n, NodeFaultKind.UNHEALTHY, why) for n in nodes if (why := reports[n].unhealthy))
    faults += tuple(
        NodeFault(n, NodeFaultKind.LOST, f"node {n}: {why}")
        for n, why in sorted(ctx.lost.items())
        if n not in reports or reports[n].unhealthy is None
    )
    missing = tuple(n for n in range(ctx.nnodes) if n not in reports and n not in ctx.lost)
    faults += tuple(NodeFault(n, NodeFaultKind.MISSING, f"the supervisor of node {n} did not report") for n in missing)

    def stop(outcome: Outcome, reason: str, uncommitted: bool = False) -> AttemptDecision:
        return AttemptDecision(outcome, reason, 0.0, reached, streak, faults, False, uncommitted)

    final_exit = next((reports[n].final_rank_exit for n in nodes if reports[n].final_rank_exit), None)
    if final_exit is not None and rank_exit_is_final(final_exit.code):
        return stop(_FINAL_RANK_EXITS[final_exit.code], f"{final_exit.reason}; not retried")
    if ctx.stop is not None and ctx.stop.kind is StopKind.STORAGE:
        return stop(Outcome.STORAGE_FAULT, ctx.stop.reason)
    finished = (
        not faults and len(nodes) == ctx.nnodes and all(reports[n].outcome is NodeOutcome.FINISHED for n in nodes)
    )
    if finished and ctx.save_on_finish:
        final = final_step_to_check(
            cfg.runs_own_trainer, cfg.final_save_check, ctx.train_steps, reached, ctx.newest_committed
        )
        if final is not None:
            committed, why = final_step_committed(final, ctx.newest_committed)
            if not committed:
                return stop(Outcome.STORAGE_FAULT, why, uncommitted=True)
    if finished:
        return stop(Outcome.FINISHED, "all ranks finished")
    preempted = ctx.stop is not None or any(reports[n].outcome is NodeOutcome.PREEMPTED for n in nodes)
    if faults and len(faults) <= ctx.spares and not preempted:
        # A lost or unhealthy node is not the run's fault: no backoff, the budget and streak are not spent.
        spares = f"{len(faults)} of {ctx.spares} spare node(s)"
        return AttemptDecision(
            None,
            f"replace {', '.join(f'node {f.node} ({f.kind})' for f in faults)} with {spares} and restart at once",
            0.0,
            reached,
            ctx.no_progress_streak,
            faults,
            True,
        )
    short = "" if not ctx.spares else f" ({len(faults)} faulty node(s), {ctx.spares} spare(s))"
    unhealthy = [f.reason for f in faults if f.kind is NodeFaultKind.UNHEALTHY]
    if unhealthy:  # requeued without it
        return stop(Outcome.UNHEALTHY, "; ".join(unhealthy) + short)
    if preempted:
        return stop(Outcome.PREEMPTED, f"stop requested ({ctx.stop.reason})" if ctx.stop else "preemption requested")
    if faults:  # lost or missing: requeued (a node that goes silent twice is excluded then, see slurm/policy.py)
        return stop(
            Outcome.COORDINATION_LOST,
            "; ".join(
                f.reason if f.kind is NodeFaultKind.LOST else f"the supervisor of node {f.node} did not report"
                for f in faults
            )
            + short,
        )
    if ctx.restarts_done >= cfg.max_restarts:
        return stop(Outcome.BUDGET_EXHAUSTED, f"restart budget of {cfg.max_restarts} exhausted")
    if streak >= cfg.max_attempts_without_progress:
        return stop(Outcome.NO_PROGRESS, f"{streak} consecutive attempts made no progress")
    number = ctx.restarts_done + 1
    if streak == 0:  # the failed attempt made progress: not a crash loop, no backoff
        return AttemptDecision(
            None, f"restart {number} of {cfg.max_restarts} at once (the attempt made progress)", 0.0, reached, streak
        )
    wait = backoff_seconds(number, cfg)
    return AttemptDecision(
        None, f"restart {number} of {cfg.max_restarts} after {wait:g}s backoff", wait, reached, streak
    )
