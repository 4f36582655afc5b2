"""How a supervised run ends: its final state and the exit code that tells the batch script what to do.

In the core so that everything that shows a run's end (`resilient status`, the report) names the same
states as the supervisor that decides them.
"""

from __future__ import annotations

import enum

from resilient.core.exit_codes import ExitCode


class Outcome(enum.StrEnum):
    """How a supervised job ends (the final state)."""

    FINISHED = "finished"
    PREEMPTED = "preempted"
    UNHEALTHY = "unhealthy"
    BUDGET_EXHAUSTED = "budget_exhausted"
    NO_PROGRESS = "no_progress"
    COORDINATION_LOST = "coordination_lost"
    STORAGE_FAULT = "storage_fault"
    CONFIG_ERROR = "config_error"
    CHECKPOINT_DAMAGED = "checkpoint_damaged"


ENDED_STATES = frozenset(o.value for o in Outcome)
"""status.json `state` values of a run that has ended."""

_EXIT_CODES = {
    Outcome.FINISHED: (ExitCode.FINISHED, "the run reached its final step"),
    Outcome.PREEMPTED: (ExitCode.PREEMPTED, "stopped on request after saving; requeue"),
    Outcome.UNHEALTHY: (ExitCode.UNHEALTHY_NODE, "a node failed its health check; requeue without it"),
    Outcome.BUDGET_EXHAUSTED: (ExitCode.RESTART_BUDGET_EXHAUSTED, "restart budget exhausted; do not requeue"),
    Outcome.NO_PROGRESS: (ExitCode.NO_PROGRESS, "attempts keep failing without progress; do not requeue"),
    Outcome.COORDINATION_LOST: (
        ExitCode.COORDINATOR_LOST,
        "lost the job's coordination (node 0's supervisor, or a node's report); requeue",
    ),
    Outcome.STORAGE_FAULT: (
        ExitCode.STORAGE_FAULT,
        "checkpoint storage is full or failing (not a node fault); free space, then rerun",
    ),
    Outcome.CONFIG_ERROR: (ExitCode.CONFIG_ERROR, "a rank found a configuration error; fix it, then rerun"),
    Outcome.CHECKPOINT_DAMAGED: (ExitCode.CHECKPOINT_DAMAGED, "no loadable checkpoint; restarting cannot help"),
}


def exit_code_for(outcome: Outcome) -> tuple[ExitCode, str]:
    """The process exit code of a supervisor for `outcome`, with what it tells the batch script."""
    return _EXIT_CODES[outcome]
