"""The coordinator's record of lost slots, kept from its reads of the lease table (the daemon's and the scale
simulator's: one judgement, so the bench measures the code that runs).

Every `read_every(node_lease_s)` the coordinator judges the leases (`election.judge_leases`): a member slot
whose lease expired is lost for the rest of the allocation; a node rank it runs ends the attempt at once
(one restart request per attempt and slot); a lost or unfit spare leaves the roster; a coordinator that no
longer sees a majority of live leases stops (NoMajority).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from resilient.supervisor import election
from resilient.supervisor.election import LeaseFindings
from resilient.supervisor.failover import NoMajority
from resilient.supervisor.leases import read_every
from resilient.supervisor.roster import Roster


class LeaseReader(Protocol):
    def lost(self, slots: list[int], now: float) -> dict[int, str]: ...


class LostSlots:
    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self.lost: dict[int, str] = {}
        """Slots whose lease expired (or that were the lost coordinator), with why."""
        self._posted: set[tuple[int, int]] = set()
        self._next_look = 0.0

    def look(
        self, now: float, roster: Roster, me: int, slots: int, leases: LeaseReader, unfit: Mapping[int, str]
    ) -> LeaseFindings | None:
        """Judge the leases if a read period has passed since the last look (None: not yet); the newly lost
        are added to `lost`. Raises NoMajority when the live members are no majority of the allocation."""
        if now < self._next_look:
            return None
        self._next_look = now + read_every(self.lease_s)
        members = [s for s in roster.members if s != me]
        found = election.judge_leases(roster, me, slots, leases.lost(members, now), unfit, self.lost)
        if not found.quorum:
            raise NoMajority(f"slot {me} coordinates without a majority: {found.why}")
        self.lost.update(found.newly_lost)
        return found

    def first_post(self, attempt: int, slot: int) -> bool:
        """Whether the loss of `slot` is yet to end `attempt` (a restart request is posted once per attempt)."""
        if (attempt, slot) in self._posted:
            return False
        self._posted.add((attempt, slot))
        return True

    def node_ranks(self, plan: Roster) -> dict[int, str]:
        """Node ranks of `plan` whose slot is lost, with why."""
        return {k: self.lost[s] for k, s in enumerate(plan.nodes) if s in self.lost}

    def waiting_for(self, plan: Roster, reported: Mapping[int, object]) -> list[int]:
        """Node ranks of `plan` whose report the decision still waits for (a lost node's never comes)."""
        lost = self.node_ranks(plan)
        return [k for k in range(len(plan.nodes)) if k not in reported and k not in lost]

    def live(self, roster: Roster) -> list[int]:
        return [s for s in roster.members if s not in self.lost]

    def after_election(self, coordinator: int, reason: str) -> None:
        """A new coordinator starts from the one it replaced, and looks at once."""
        self.lost, self._posted = {coordinator: reason}, set()
        self.look_now()

    def look_now(self) -> None:
        self._next_look = 0.0
