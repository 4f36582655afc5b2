"""Choosing a new coordinator when the current one is lost, as pure functions.

Every surviving supervisor tries the candidates in one order, the same everywhere: the members of the
newest roster it has (nodes and spares), lowest slot first, without the lost coordinator. It joins the
first candidate it reaches; a candidate that is itself waits for joins. A candidate becomes coordinator
only once a majority of the allocation's slots (dead and failed ones counted) has joined it, and a
supervisor joins at most one candidate per epoch; a coordinator keeps deciding only while a majority
of the slots hold live leases. Two majorities of one allocation share a slot, and that slot joined
only one of them: two coordinators of one epoch cannot both win, and a coordinator cut off with a
minority cannot go on (docs/operations.md, "Why there is never a second coordinator").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from resilient.supervisor.roster import Roster


def majority(slots: int) -> int:
    """Slots that must agree in an allocation of `slots`."""
    return slots // 2 + 1


def has_quorum(live: Iterable[int], slots: int) -> tuple[bool, str]:
    """Whether the slots `live` (with live leases, or joined) are a majority of the allocation."""
    n, need = len(set(live)), majority(slots)
    if n >= need:
        return True, f"{n} of {slots} slots live (majority {need})"
    return False, f"only {n} of {slots} slots live: a majority ({need}) is needed to go on"


@dataclass(frozen=True)
class LeaseFindings:
    """What the coordinator makes of the lease table at one look."""

    newly_lost: dict[int, str]
    """Member slots whose lease expired since the last look (their node ranks end the attempt)."""
    gone_spares: dict[int, str]
    """Spares to take off the roster: lost, or unfit by their own health checks."""
    quorum: bool
    why: str


def judge_leases(
    roster: Roster,
    me: int,
    slots: int,
    expired: Mapping[int, str],
    unfit: Mapping[int, str],
    known_lost: Mapping[int, str],
) -> LeaseFindings:
    """The coordinator `me` goes on only while the live members are a majority of the allocation."""
    gone = {**known_lost, **expired}
    live = [s for s in roster.members if s == me or s not in gone]
    quorum, why = has_quorum(live, slots)
    newly = {s: w for s, w in expired.items() if s not in known_lost and s != me and s in roster.members}
    spares = {s: w for s, w in {**unfit, **gone}.items() if s in roster.spares}
    return LeaseFindings(newly, spares, quorum, why)


def candidates(roster: Roster, lost: Iterable[int]) -> list[int]:
    """The order in which survivors try to reach a new coordinator."""
    gone = set(lost)
    return [s for s in roster.members if s not in gone]


CARRIED = ("attempt", "roster", "restarts", "no_progress_streak", "first_attempt")
"""What an election carries over of a supervisor's view of the run (`Join`, `Takeover`), besides its slot:
attributes of the same names on the daemon's Supervisor and the simulator's SimNode."""


@dataclass(frozen=True)
class Join:
    """What a supervisor brings to a candidate: its view of the run when the coordinator was lost."""

    slot: int
    attempt: int
    roster: Roster
    restarts: int
    no_progress_streak: int
    first_attempt: int
    stop: Mapping[str, Any] | None = None
    """The job's stop request, if this supervisor had seen one (sealed fields, as in the store)."""

    @classmethod
    def of(cls, me: Any, stop: Mapping[str, Any] | None) -> Join:
        """The view of supervisor `me` (its slot and the CARRIED attributes)."""
        return cls(slot=me.slot, stop=stop, **{name: getattr(me, name) for name in CARRIED})


@dataclass(frozen=True)
class Takeover:
    """What the new coordinator continues from."""

    attempt: int
    """The attempt that was running (or ending) when the coordinator was lost: it ends as failed."""
    roster: Roster
    restarts: int
    no_progress_streak: int
    first_attempt: int
    stop: Mapping[str, Any] | None

    def carry_on(self, me: Any) -> None:
        """Supervisor `me` continues from this takeover (the CARRIED attributes)."""
        for name in CARRIED:
            setattr(me, name, getattr(self, name))


def merge(joins: Mapping[int, Join]) -> Takeover:
    """The newest roster any joiner had and the furthest attempt; a stop any joiner saw still stands."""
    if not joins:
        raise ValueError("no joins")
    newest = max(joins.values(), key=lambda j: (j.roster.version, j.attempt))
    attempt = max(j.attempt for j in joins.values())
    stop = next((j.stop for j in joins.values() if j.stop is not None), None)
    return Takeover(
        attempt,
        newest.roster,
        max(j.restarts for j in joins.values()),
        max(j.no_progress_streak for j in joins.values()),
        min(j.first_attempt for j in joins.values()),
        stop,
    )
