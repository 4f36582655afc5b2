"""Checkpoint decisions as pure functions: when to save, what to keep, which one to load (the memory
tier's choice at a restart: trainer/checkpoint/memory/choice.py)."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.checkpoint.config import CheckpointConfig


@dataclass(frozen=True)
class SaveDecision:
    yes: bool
    reason: str


def should_save(
    cfg: CheckpointConfig,
    *,
    interval_steps: int,
    step: int,
    final_step: int,
    last_save_step: int | None,
    seconds_since_save: float,
    stop_requested: bool,
) -> SaveDecision:
    """Save after `step`? Stop requests and the final step always save (unless just saved).
    `interval_steps` is the disk tier's current interval (`cfg.interval_steps` is only where an
    adaptive one starts)."""
    if last_save_step == step:
        return SaveDecision(False, f"step {step} is already saved")
    if stop_requested:
        return SaveDecision(True, "stop requested")
    if step == final_step and cfg.save_on_finish:
        return SaveDecision(True, "final step")
    if interval_steps and _interval_due(interval_steps, cfg.adaptive, step, last_save_step):
        return SaveDecision(True, f"every {interval_steps} steps")
    if cfg.interval_minutes and seconds_since_save >= cfg.interval_minutes * 60:
        return SaveDecision(True, f"{cfg.interval_minutes:g} minutes since the last save")
    return SaveDecision(False, "no trigger")


def _interval_due(interval_steps: int, adaptive: bool, step: int, last_save_step: int | None) -> bool:
    """Fixed intervals save at multiples of the interval; an adaptive one counts from the last save of
    the attempt (a change of interval neither saves twice in a row nor skips one), else from step 0."""
    if adaptive and last_save_step is not None:
        return step - last_save_step >= interval_steps
    return step % interval_steps == 0


def to_delete(committed: list[int], *, keep_last: int, keep_every: int, protected: set[int]) -> list[int]:
    """Committed steps retention may delete: all but the newest `keep_last`, the multiples of
    `keep_every`, and `protected` (the one `latest` names, one being written)."""
    newest = set(sorted(committed)[-keep_last:]) if keep_last else set()
    keep = newest | protected | {s for s in committed if keep_every and s % keep_every == 0}
    if not keep and committed:
        keep = {max(committed)}  # never delete the only complete checkpoint
    return sorted(s for s in committed if s not in keep)


def load_candidates(committed: list[int], *, load_step: int | None) -> list[int]:
    """Steps to try, in order: the requested one only, or every committed one newest first.
    The marker, not the `latest` pointer, decides completeness: a crash between the marker and
    the pointer update leaves a complete checkpoint that `latest` does not name yet."""
    if load_step is not None:
        return [load_step]
    return sorted(committed, reverse=True)


def newest_at_most(committed: list[int], bound: int | None) -> int | None:
    """The newest committed step at or before `bound` (any, for None); None when there is none."""
    eligible = [s for s in committed if bound is None or s <= bound]
    return max(eligible) if eligible else None


def should_snapshot(
    interval_steps: int, *, step: int, final_step: int, disk_saved: bool, last_snapshot: int | None = None
) -> SaveDecision:
    """Take a memory-tier snapshot after `step`? Not when the disk tier just saved the same step (a
    restart would prefer disk at an equal step) and not at the final step (nothing left to resume).
    With `last_snapshot` (an adaptive interval) the interval counts from it, else from step 0."""
    if not interval_steps:
        return SaveDecision(False, "memory tier off")
    if disk_saved:
        return SaveDecision(False, f"step {step} is on disk")
    if step >= final_step:
        return SaveDecision(False, "final step")
    due = step - last_snapshot >= interval_steps if last_snapshot is not None else step % interval_steps == 0
    if not due:
        return SaveDecision(False, "no trigger")
    return SaveDecision(True, f"every {interval_steps} steps")
