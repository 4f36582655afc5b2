"""Why Megatron-LM's loop ended, as the exit code the supervisor acts on (a pure decision).

Megatron exits 0 for very different reasons: it reached `--train-iters`, a stop signal made it save
and leave (`--exit-signal-handler`), or `--exit-interval` / `--exit-duration-in-mins` ended this
allocation's share of the run. Only the first one means "finished"; the others want a requeue.
Its rerun state machine exits 16 or 17 when a result did not reproduce: a suspected bad GPU, so the
node is taken out.
"""

from __future__ import annotations

from dataclasses import dataclass

from resilient.core.exit_codes import ExitCode

RESUME_TO_DISAMBIGUATE = 16
"""megatron.core.rerun_state_machine: rerun the step on other hardware to tell a fault from the data."""
FAILED_ON_RESULT_VALIDATION = 17
"""megatron.core.rerun_state_machine: a result did not reproduce on this hardware."""

ARGPARSE_ERROR = 2
"""argparse's exit code for a bad command line."""


@dataclass(frozen=True)
class LoopEnd:
    """What the wrapper saw when the script stopped."""

    megatron_code: int | None
    """The code Megatron exited with (sys.exit), or None when the script returned."""
    iteration: int
    """Iterations completed (the resume point plus the steps of this attempt)."""
    train_iters: int | None
    """`--train-iters` as Megatron resolved it (None: not known, e.g. before argument parsing)."""
    stop_requested: bool
    """A stop signal reached this rank."""
    exit_interval: int | None = None
    """`--exit-interval`."""
    exit_duration_mins: float | None = None
    """`--exit-duration-in-mins`."""
    trained: bool = False
    """The loop got as far as a training iteration (or a checkpoint load)."""
    error: str | None = None
    """An exception that escaped the script (type: message)."""
    args_parsed: bool = True
    """Megatron had parsed and validated its arguments (its global args exist)."""


def classify(end: LoopEnd) -> tuple[ExitCode, str]:
    """The rank's exit code and why."""
    code = end.megatron_code
    at = f"at iteration {end.iteration}"
    if code in (RESUME_TO_DISAMBIGUATE, FAILED_ON_RESULT_VALIDATION):
        what = (
            "a result did not reproduce on this node's hardware"
            if code == FAILED_ON_RESULT_VALIDATION
            else "a result must be rerun on other hardware to tell a fault from the data"
        )
        return ExitCode.UNHEALTHY_NODE, f"Megatron's rerun state machine exited {code} {at}: {what}"
    if not end.args_parsed and (end.error is not None or code == ARGPARSE_ERROR):
        why = end.error or "exit 2"
        return ExitCode.CONFIG_ERROR, f"Megatron-LM rejected its arguments ({why}); see the rank log"
    if end.error is not None:
        return ExitCode.RANK_FAILED, f"{end.error} {at}"
    if code not in (None, 0):
        return ExitCode.RANK_FAILED, f"Megatron-LM exited {code} {at}"
    if end.train_iters is not None and end.iteration >= end.train_iters:
        return ExitCode.FINISHED, f"reached --train-iters {end.train_iters}"
    if end.stop_requested:
        return ExitCode.PREEMPTED, f"stopped on request {at} after saving"
    if end.exit_interval and end.iteration % end.exit_interval == 0:
        return ExitCode.PREEMPTED, f"--exit-interval {end.exit_interval} reached {at}; requeue to continue"
    if end.exit_duration_mins:
        return ExitCode.PREEMPTED, (
            f"--exit-duration-in-mins {end.exit_duration_mins:g} reached {at}; requeue to continue"
        )
    if code is None and end.train_iters is None:
        return ExitCode.FINISHED, f"the script returned {at}"
    return ExitCode.RANK_FAILED, f"Megatron-LM stopped {at} before --train-iters {end.train_iters} without a reason"
