"""Which tier a restart takes, and from which copies, as pure functions of what the ranks offer.

A rank's copy of a step comes from its own memory ("own") or from the replica another rank holds for
it ("replica@<holder rank>"); `holder_in` is the one reader of that spelling, which the ledger's
`ckpt_load` records carry.
"""

from __future__ import annotations

from dataclasses import dataclass, field

OWN = "own"
DISK = "disk"
_REPLICA = "replica@"


def replica_source(holder: int) -> str:
    return f"{_REPLICA}{holder}"


def holder_in(source: str) -> int | None:
    """The holder rank a source names (None: the rank's own copy, or disk)."""
    return int(source[len(_REPLICA) :]) if source.startswith(_REPLICA) else None


@dataclass(frozen=True)
class Inventory:
    """What one rank can offer at a restart: its own memory snapshots and the replicas it holds for
    `replica_of` (the rank it holds for in the ring, None when the run has one node). Each maps
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
            return DISK
        return "memory-replica" if any(s != OWN for s in self.sources) else "memory-own"


def mark_failed(inventories: list[Inventory], choice: TierChoice, problems: list[str | None]) -> list[Inventory]:
    """The inventories with the copies `choice` took that failed at load (`problems[r]`, rank r's copy
    from `choice.sources[r]`) marked bad, so the next `choose_tier` passes them over: another copy of
    the same step (a replica for a damaged own copy) or the next step, never further than needed."""
    out = [Inventory(dict(inv.own), inv.replica_of, dict(inv.replica)) for inv in inventories]
    for rank, problem in enumerate(problems):
        if problem is None or choice.step is None:
            continue
        holder = holder_in(choice.sources[rank])
        if holder is None:
            out[rank].own[choice.step] = problem
        else:
            out[holder].replica[choice.step] = problem
    return out


def choose_tier(inventories: list[Inventory], *, disk_step: int | None, at_most: int | None = None) -> TierChoice:
    """The newest step for which EVERY rank has a valid memory copy (its own, else the replica a rank
    on the next node holds for it), when it is newer than the newest committed disk checkpoint;
    otherwise disk. `at_most`: no step after it (state after a silent-data-corruption finding's last
    agreeing step is not trusted). The reason names each newer step that was passed over and why."""
    world = len(inventories)
    holders = {inv.replica_of: h for h, inv in enumerate(inventories) if inv.replica_of is not None}
    steps = sorted({s for inv in inventories for s in (*inv.own, *inv.replica)}, reverse=True)
    passed: list[str] = []
    for step in steps:
        if disk_step is not None and step <= disk_step:
            break
        if at_most is not None and step > at_most:
            passed.append(f"step {step}: after the trusted step {at_most}")
            continue
        sources, missing = [], []
        for rank, inv in enumerate(inventories):
            if step in inv.own and inv.own[step] is None:
                sources.append(OWN)
                continue
            holder = holders.get(rank)
            held = inventories[holder].replica.get(step, "missing") if holder is not None else "no replica holder"
            if holder is not None and step in inventories[holder].replica and held is None:
                sources.append(replica_source(holder))
                continue
            missing.append(f"rank {rank} (own: {inv.own.get(step, 'missing')}; replica: {held})")
        if not missing:
            used = "own memory" if all(s == OWN for s in sources) else "memory with replicas"
            over = f"; passed over {'; '.join(passed)}" if passed else ""
            return TierChoice(step, tuple(sources), f"step {step} from {used}, newer than disk step {disk_step}{over}")
        passed.append(f"step {step}: no valid copy for {', '.join(missing)}")
    why = "; ".join(passed) if passed else "no memory snapshot newer than disk"
    return TierChoice(None, (DISK,) * world, f"disk step {disk_step}: {why}")
