"""Checkpoint decisions as pure functions: when to save, what to keep, which one to load."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.checkpoint.config import CheckpointConfig


@dataclass(frozen=True)
class SaveDecision:
    yes: bool
    reason: str


def should_save(cfg: CheckpointConfig, *, step: int, final_step: int, last_save_step: int | None,
                seconds_since_save: float, stop_requested: bool) -> SaveDecision:
    """Save after `step`? Stop requests and the final step always save (unless just saved)."""
    if last_save_step == step:
        return SaveDecision(False, f"step {step} is already saved")
    if stop_requested:
        return SaveDecision(True, "stop requested")
    if step == final_step and cfg.save_on_finish:
        return SaveDecision(True, "final step")
    if cfg.interval_steps and _interval_due(cfg, step, last_save_step):
        return SaveDecision(True, f"every {cfg.interval_steps} steps")
    if cfg.interval_minutes and seconds_since_save >= cfg.interval_minutes * 60:
        return SaveDecision(True, f"{cfg.interval_minutes:g} minutes since the last save")
    return SaveDecision(False, "no trigger")


def _interval_due(cfg: CheckpointConfig, step: int, last_save_step: int | None) -> bool:
    """Fixed intervals save at multiples of the interval; an adaptive one counts from the last save of
    the attempt (a change of interval neither saves twice in a row nor skips one), else from step 0."""
    if cfg.adaptive and last_save_step is not None:
        return step - last_save_step >= cfg.interval_steps
    return step % cfg.interval_steps == 0


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


def should_snapshot(interval_steps: int, *, step: int, final_step: int, disk_saved: bool,
                    last_snapshot: int | None = None) -> SaveDecision:
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


@dataclass(frozen=True)
class Inventory:
    """What one rank can offer at a restart: its own memory snapshots and the replicas it holds for
    `replica_of` (the rank one node back in the ring, None when the run has one node). Each maps
    step -> None (valid) or the problem found (checksum mismatch, not committed, other layout...)."""

    own: dict[int, str | None]
    replica_of: int | None = None
    replica: dict[int, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class TierChoice:
    """A restart's source: `step` None means disk; `sources[r]` is "own" or "replica@<holder rank>"."""

    step: int | None
    sources: tuple[str, ...]
    reason: str

    @property
    def tier(self) -> str:
        if self.step is None:
            return "disk"
        return "memory-replica" if any(s != "own" for s in self.sources) else "memory-own"


def mark_failed(inventories: list[Inventory], choice: TierChoice, problems: list[str | None]) -> list[Inventory]:
    """The inventories with the copies `choice` took that failed at load (`problems[r]`, rank r's copy
    from `choice.sources[r]`) marked bad, so the next `choose_tier` passes them over: another copy of
    the same step (a replica for a damaged own copy) or the next step, never further than needed."""
    out = [Inventory(dict(inv.own), inv.replica_of, dict(inv.replica)) for inv in inventories]
    for rank, problem in enumerate(problems):
        if problem is None or choice.step is None:
            continue
        source = choice.sources[rank]
        if source == "own":
            out[rank].own[choice.step] = problem
        else:
            out[int(source.split("@", 1)[1])].replica[choice.step] = problem
    return out


def choose_tier(inventories: list[Inventory], *, disk_step: int | None) -> TierChoice:
    """The newest step for which EVERY rank has a valid memory copy (its own, else the replica a rank
    on the next node holds for it), when it is newer than the newest committed disk checkpoint;
    otherwise disk. The reason names each newer step that was passed over and why."""
    world = len(inventories)
    holders = {inv.replica_of: h for h, inv in enumerate(inventories) if inv.replica_of is not None}
    steps = sorted({s for inv in inventories for s in (*inv.own, *inv.replica)}, reverse=True)
    passed: list[str] = []
    for step in steps:
        if disk_step is not None and step <= disk_step:
            break
        sources, missing = [], []
        for rank, inv in enumerate(inventories):
            if step in inv.own and inv.own[step] is None:
                sources.append("own")
                continue
            holder = holders.get(rank)
            held = inventories[holder].replica.get(step, "missing") if holder is not None else "no replica holder"
            if holder is not None and step in inventories[holder].replica and held is None:
                sources.append(f"replica@{holder}")
                continue
            missing.append(f"rank {rank} (own: {inv.own.get(step, 'missing')}; replica: {held})")
        if not missing:
            why = "; ".join(passed)
            used = "own memory" if all(s == "own" for s in sources) else "memory with replicas"
            return TierChoice(step, tuple(sources),
                              f"step {step} from {used}, newer than disk step {disk_step}" + (f"; passed over {why}" if why else ""))
        passed.append(f"step {step}: no valid copy for {', '.join(missing)}")
    why = "; ".join(passed) if passed else "no memory snapshot newer than disk"
    return TierChoice(None, ("disk",) * world, f"disk step {disk_step}: {why}")
