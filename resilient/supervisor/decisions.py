"""The supervisor's decisions as pure functions of (time, state): each returns its answer and a reason.

Nothing here touches processes, clocks or files, so every branch is unit-tested with injected time.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import tenacity

from resilient.core.exit_codes import ExitCode
from resilient.rank.heartbeat import Phase
from resilient.supervisor.config import SupervisorConfig


def calibrated_step_timeout(step_times: Sequence[float], cfg: SupervisorConfig) -> tuple[float, str]:
    """Step timeout from recent step times: factor x the slowest, never below the floor."""
    recent = [t for t in step_times[-cfg.step_timeout_window:] if t > 0]
    if len(recent) < cfg.step_timeout_min_samples:
        return cfg.step_timeout_initial_s, (
            f"initial step timeout {cfg.step_timeout_initial_s:g}s "
            f"({len(recent)}/{cfg.step_timeout_min_samples} step times observed)"
        )
    slowest = max(recent)
    scaled = cfg.step_timeout_factor * slowest
    if scaled < cfg.step_timeout_floor_s:
        return cfg.step_timeout_floor_s, (
            f"step timeout floor {cfg.step_timeout_floor_s:g}s "
            f"(> {cfg.step_timeout_factor:g} x slowest recent step {slowest:.3g}s)"
        )
    return scaled, f"calibrated step timeout {scaled:.3g}s = {cfg.step_timeout_factor:g} x slowest recent step {slowest:.3g}s"


def calibrated_checkpoint_timeout(blocking_times: Sequence[float], cfg: SupervisorConfig) -> tuple[float, str]:
    """Checkpoint-phase timeout: the configured one until a save was seen, then the step factor x the
    slowest observed loop-blocking save time, within [step floor, configured]. A rank stuck while its
    peers wait in the save's collectives is then caught in seconds, not at the configured maximum."""
    recent = [t for t in blocking_times if t > 0]
    if not recent:
        return cfg.checkpoint_timeout_s, f"checkpoint timeout {cfg.checkpoint_timeout_s:g}s (no save observed yet)"
    scaled = min(cfg.checkpoint_timeout_s, max(cfg.step_timeout_floor_s, cfg.step_timeout_factor * max(recent)))
    return scaled, f"calibrated checkpoint timeout {scaled:.3g}s (slowest observed save {max(recent):.3g}s)"


def phase_timeout(phase: str, step_timeout: float, cfg: SupervisorConfig,
                  checkpoint_timeout: float | None = None) -> tuple[float, str]:
    """Which timeout governs a rank whose last heartbeat was in `phase`."""
    fixed = {
        Phase.INIT: cfg.init_timeout_s,
        Phase.RESTORE: cfg.restore_timeout_s,
        Phase.CHECKPOINT: checkpoint_timeout or cfg.checkpoint_timeout_s,
        Phase.DONE: cfg.checkpoint_timeout_s,
        Phase.EVAL: cfg.eval_timeout_s,
    }
    if phase in fixed:
        return fixed[phase], f"{phase} timeout {fixed[phase]:g}s"
    return step_timeout, f"step timeout {step_timeout:.3g}s"


def is_hung(phase: str, last_progress: float, now: float, step_timeout: float,
            cfg: SupervisorConfig, checkpoint_timeout: float | None = None) -> tuple[bool, str]:
    """A rank is hung when it made no heartbeat progress (new phase or step) within its phase's timeout."""
    limit, which = phase_timeout(phase, step_timeout, cfg, checkpoint_timeout)
    idle = now - last_progress
    if idle > limit:
        return True, f"no heartbeat progress for {idle:.1f}s in phase {phase} (exceeds {which})"
    return False, f"{idle:.1f}s since progress in phase {phase} (within {which})"


def blame_hang(stale: list[tuple[int, int | None, float, str]]) -> tuple[int, str]:
    """Among ranks past their timeout, given as (rank, last step, last progress time, process state),
    the one that holds the others up: peers of a stuck rank wait in its collective and go stale too.
    A stopped process (SIGSTOP, a debugger) first, then the lowest step, then the oldest progress."""
    def key(item: tuple[int, int | None, float, str]) -> tuple[int, int, float, int]:
        rank, step, last, state = item
        return (0 if state in ("stopped", "tracing-stop") else 1, -1 if step is None else step, last, rank)

    rank, step, _, state = min(stale, key=key)
    if len(stale) == 1:
        return rank, "the only rank without progress"
    why = f"process {state}" if state in ("stopped", "tracing-stop") else f"lowest step ({step}) / oldest progress"
    return rank, f"{len(stale)} ranks without progress; rank {rank} holds them up ({why})"


def all_done(ranks: Sequence[tuple[str, int | None]]) -> bool:
    """Every rank, given as (last phase, exit code or None), exited 0 or reported `done` (it may be
    lingering in teardown: a stuck process-group shutdown must not hold the node for the done timeout)."""
    return all(code == 0 or (code is None and phase == "done") for phase, code in ranks)


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
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = max(1, restart_number)
    return float(wait(state))


def final_step_to_check(own_trainer: bool, configured: bool | None, train_steps: int,
                        reached_step: int | None, newest_committed: int | None) -> int | None:
    """The step that must be committed before a run may end "finished", or None where it is not checked.
    The own trainer's final step is `train.steps`; another script's is the step its heartbeats reached.
    `configured` (supervisor.final_save_check) decides; unset, another script is checked only once its
    checkpoints are found in a layout the supervisor reads (ours or Megatron-LM's). An exit-only script
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
    return False, f"ranks finished step {final_step} but it is not in a committed checkpoint (newest committed: {newest})"


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


_EXIT_CODES = {
    Outcome.FINISHED: (ExitCode.FINISHED, "the run reached its final step"),
    Outcome.PREEMPTED: (ExitCode.PREEMPTED, "stopped on request after saving; requeue"),
    Outcome.UNHEALTHY: (ExitCode.UNHEALTHY_NODE, "a node failed its health check; requeue without it"),
    Outcome.BUDGET_EXHAUSTED: (ExitCode.RESTART_BUDGET_EXHAUSTED, "restart budget exhausted; do not requeue"),
    Outcome.NO_PROGRESS: (ExitCode.NO_PROGRESS, "attempts keep failing without progress; do not requeue"),
    Outcome.COORDINATION_LOST: (ExitCode.COORDINATOR_LOST,
                                "lost the job's coordination (node 0's supervisor, or a node's report); requeue"),
    Outcome.STORAGE_FAULT: (ExitCode.STORAGE_FAULT,
                            "checkpoint storage is full or failing (not a node fault); free space, then rerun"),
    Outcome.CONFIG_ERROR: (ExitCode.CONFIG_ERROR, "a rank found a configuration error; fix it, then rerun"),
    Outcome.CHECKPOINT_DAMAGED: (ExitCode.CHECKPOINT_DAMAGED, "no loadable checkpoint; restarting cannot help"),
}

# A rank exiting with one of these found something no restart can change (bad config or data, no
# loadable checkpoint): the run ends at once with the rank's own code.
_FINAL_RANK_EXITS = {int(ExitCode.CONFIG_ERROR): Outcome.CONFIG_ERROR,
                     int(ExitCode.CHECKPOINT_DAMAGED): Outcome.CHECKPOINT_DAMAGED}


def rank_exit_is_final(code: int | None) -> bool:
    """Whether a rank's exit code ends the run instead of a restart."""
    return code in _FINAL_RANK_EXITS


def exit_code_for(outcome: Outcome) -> tuple[ExitCode, str]:
    """The process exit code of a supervisor for `outcome`, with what it tells the batch script."""
    return _EXIT_CODES[outcome]


@dataclass(frozen=True)
class JobState:
    """What node 0 knows when an attempt has ended on every node."""

    restarts_done: int
    """In-job restarts already performed."""
    no_progress_streak: int
    """Consecutive ended attempts without progress, including the one that just ended."""
    all_finished: bool = False
    """Every node's ranks exited 0."""
    preempted: bool = False
    """A stop was requested (signal to a supervisor or a rank exiting PREEMPTED)."""
    unhealthy: str | None = None
    """Fatal health verdict of some node (names node and check), if any."""
    missing_nodes: tuple[int, ...] = ()
    """Nodes whose supervisor did not report in time."""
    storage: str | None = None
    """Storage trouble (low or no space, failed writes, final step not committed), if any."""
    final_rank_exit: tuple[int, str] | None = None
    """(code, reason) of a rank that exited CONFIG_ERROR or CHECKPOINT_DAMAGED, if any."""


@dataclass(frozen=True)
class Decision:
    restart: bool
    exit_code: ExitCode
    outcome: Outcome | None
    reason: str
    backoff_s: float = 0.0


def _stop(outcome: Outcome, reason: str) -> Decision:
    return Decision(False, exit_code_for(outcome)[0], outcome, reason)


def decide(state: JobState, cfg: SupervisorConfig) -> Decision:
    """Restart or stop after an attempt ended; stop reasons are checked from most to least specific."""
    if state.final_rank_exit:
        code, reason = state.final_rank_exit
        return _stop(_FINAL_RANK_EXITS[code], f"{reason}; not retried")
    if state.storage:  # before "finished": success is only reported when the final step is committed
        return _stop(Outcome.STORAGE_FAULT, state.storage)
    if state.all_finished:
        return _stop(Outcome.FINISHED, "all ranks finished")
    if state.unhealthy:
        return _stop(Outcome.UNHEALTHY, state.unhealthy)
    if state.preempted:
        return _stop(Outcome.PREEMPTED, "preemption requested")
    if state.missing_nodes:
        nodes = ", ".join(str(n) for n in state.missing_nodes)
        return _stop(Outcome.COORDINATION_LOST, f"supervisor of node(s) {nodes} did not report")
    if state.restarts_done >= cfg.max_restarts:
        return _stop(Outcome.BUDGET_EXHAUSTED, f"restart budget of {cfg.max_restarts} exhausted")
    if state.no_progress_streak >= cfg.max_attempts_without_progress:
        return _stop(Outcome.NO_PROGRESS, f"{state.no_progress_streak} consecutive attempts made no progress")
    number = state.restarts_done + 1
    if state.no_progress_streak == 0:  # the failed attempt made progress: not a crash loop, no backoff
        return Decision(True, ExitCode.FINISHED, None,
                        f"restart {number} of {cfg.max_restarts} at once (the attempt made progress)", 0.0)
    wait = backoff_seconds(number, cfg)
    return Decision(True, ExitCode.FINISHED, None,
                    f"restart {number} of {cfg.max_restarts} after {wait:g}s backoff", wait)
