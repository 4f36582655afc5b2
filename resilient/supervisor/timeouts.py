"""Hang detection as pure functions of (time, heartbeats): the calibrated step and checkpoint timeouts,
the timeout of each phase, whether a rank is hung, which stale rank to blame, and when a node's ranks
are done. Each returns its answer and a reason; `failures.hang_failure` applies them to the processes.
"""

from __future__ import annotations

from collections.abc import Sequence

from resilient.rank.heartbeat import Phase
from resilient.supervisor.config import SupervisorConfig


def calibrated_step_timeout(step_times: Sequence[float], cfg: SupervisorConfig) -> tuple[float, str]:
    """Step timeout from recent step times: factor x the slowest, never below the floor."""
    recent = [t for t in step_times[-cfg.step_timeout_window :] if t > 0]
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
    return scaled, (
        f"calibrated step timeout {scaled:.3g}s = {cfg.step_timeout_factor:g} x slowest recent step {slowest:.3g}s"
    )


def calibrated_checkpoint_timeout(blocking_times: Sequence[float], cfg: SupervisorConfig) -> tuple[float, str]:
    """Checkpoint-phase timeout: the configured one until a save was seen, then the step factor x the
    slowest observed loop-blocking save time, within [step floor, configured]. A rank stuck while its
    peers wait in the save's collectives is then caught in seconds, not at the configured maximum."""
    recent = [t for t in blocking_times if t > 0]
    if not recent:
        return cfg.checkpoint_timeout_s, f"checkpoint timeout {cfg.checkpoint_timeout_s:g}s (no save observed yet)"
    scaled = min(cfg.checkpoint_timeout_s, max(cfg.step_timeout_floor_s, cfg.step_timeout_factor * max(recent)))
    return scaled, f"calibrated checkpoint timeout {scaled:.3g}s (slowest observed save {max(recent):.3g}s)"


def phase_timeout(
    phase: str,
    step_timeout: float,
    cfg: SupervisorConfig,
    checkpoint_timeout: float | None = None,
    *,
    first_step: bool = False,
) -> tuple[float, str]:
    """Which timeout governs a rank whose last heartbeat was in `phase`. A rank's `first_step` of an attempt
    (or after a rollback) gets the initial step timeout: its one-off costs (lazy communicator setup, data-loader
    workers, compilation) are not in the step times the calibrated timeout comes from."""
    fixed: dict[str, float] = {  # Phase is a StrEnum: a heartbeat's phase string finds its member
        Phase.INIT: cfg.init_timeout_s,
        Phase.BUILD: cfg.build_timeout_s,
        Phase.RESTORE: cfg.restore_timeout_s,
        Phase.CHECKPOINT: checkpoint_timeout or cfg.checkpoint_timeout_s,
        Phase.FINALIZE: cfg.checkpoint_timeout_s,  # a whole write: never the calibrated blocking time
        Phase.DONE: cfg.checkpoint_timeout_s,
        Phase.EVAL: cfg.eval_timeout_s,
    }
    if phase in fixed:
        return fixed[phase], f"{phase} timeout {fixed[phase]:g}s"
    if first_step:
        limit = max(step_timeout, cfg.step_timeout_initial_s)
        return limit, f"first step's timeout {limit:g}s"
    return step_timeout, f"step timeout {step_timeout:.3g}s"


def is_hung(phase: str, last_progress: float, now: float, timeout: tuple[float, str]) -> tuple[bool, str]:
    """A rank is hung when it made no heartbeat progress (new phase or step) within its phase's `timeout`
    (`phase_timeout`'s answer: the limit and which one it is)."""
    limit, which = timeout
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
