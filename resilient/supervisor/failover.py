"""The election protocol when the coordinator is lost (its rules, pure, are in election.py).

Each survivor tries the candidates in order: itself -> host the next epoch's store and wait for a
majority to join; another -> connect to that candidate's store (for `candidate_window_s`), join, and
wait for its roster of the new epoch. A survivor that joined a candidate that never won, or that finds
no candidate with a majority, is on the minority side: NoMajority (it stops and touches nothing).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from resilient.core.exit_codes import ExitCode
from resilient.supervisor import election
from resilient.supervisor import roster as rosters
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.coordination import Access, CoordinationLost, Coordinator
from resilient.supervisor.election import Join, Takeover
from resilient.supervisor.reports import NodeOutcome
from resilient.supervisor.roster import Roster

T = TypeVar("T")

FAILOVER_KEY = "run/failover"
"""Where a new coordinator puts the attempt, restarts and streak the joiners continue from."""


class NoMajority(CoordinationLost):
    """This supervisor is not with a majority of the allocation: it stops its ranks and touches nothing."""

    exit_code = ExitCode.COORDINATOR_LOST


def attempt_then_decision(
    run: Callable[[], NodeOutcome | None],
    report: Callable[[NodeOutcome], None],
    decide: Callable[[], T],
    fail_over: Callable[[CoordinationLost], None],
) -> T:
    """One attempt in a slot's role, its report and the coordinator's decision, across coordinator losses
    (the daemon's and the scale simulation's loop): losing the coordinator during the attempt ends it
    FAILED; after each failover the report goes again, to the new coordinator. `run` returns None when
    there is nothing to report (a spare's standby); NoMajority passes: that side stops."""
    try:
        outcome = run()
    except NoMajority:
        raise
    except CoordinationLost as err:
        fail_over(err)
        outcome = NodeOutcome.FAILED
    while True:
        try:
            if outcome is not None:
                report(outcome)
            return decide()
        except NoMajority:
            raise
        except CoordinationLost as err:
            fail_over(err)
            outcome = NodeOutcome.FAILED


def candidate_window_s(cfg: SupervisorConfig) -> float:
    """How long a survivor tries to reach one candidate: the survivors notice the loss up to a lease apart."""
    return 2 * cfg.node_lease_s


def election_timeout_s(cfg: SupervisorConfig) -> float:
    """How long a candidate waits for a majority, and a joiner for the candidate's roster."""
    return 3 * cfg.node_lease_s


def join_to_store(j: Join) -> dict[str, Any]:
    return {
        "slot": j.slot,
        "attempt": j.attempt,
        "roster": rosters.to_store(j.roster),
        "restarts": j.restarts,
        "no_progress_streak": j.no_progress_streak,
        "first_attempt": j.first_attempt,
        "stop": j.stop,
    }


def join_from_store(v: dict[str, Any]) -> Join:
    return Join(
        int(v["slot"]),
        int(v["attempt"]),
        rosters.from_store(v["roster"]),
        int(v["restarts"]),
        int(v["no_progress_streak"]),
        int(v["first_attempt"]),
        v.get("stop"),
    )


def elect(
    access: Access,
    me: Join,
    lost: int,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[Coordinator, bool, Takeover]:
    """Run the election of epoch `me.roster.epoch + 1` after coordinator slot `lost` was lost; returns the new
    epoch's store, whether this supervisor won it, and what the run continues from (the new roster, the
    attempt that ended with the loss, the restart count and streak)."""
    topo, cfg = access.topo, access.cfg
    epoch = me.roster.epoch + 1
    poll = cfg.poll_interval_s / 2
    for candidate in election.candidates(me.roster, [lost]):
        if candidate == topo.slot:
            return _stand(access, me, lost, epoch, clock, sleep)
        try:
            coord = Coordinator.open(
                access, coordinator=candidate, epoch=epoch, connect_timeout_s=candidate_window_s(cfg)
            )
        except CoordinationLost as err:
            print(f"resilient: slot {topo.slot}: candidate slot {candidate} not reached: {err}", file=sys.stderr)
            continue
        # Joined: this supervisor is with this candidate for the epoch, whatever happens to it next.
        deadline = clock() + election_timeout_s(cfg)
        try:
            coord.join(join_to_store(me))
            while clock() < deadline:
                roster = coord.roster()
                if roster is not None and roster.epoch == epoch:
                    return coord, False, _takeover_from_store(coord.store.get(FAILOVER_KEY), roster)
                sleep(poll)
        except CoordinationLost as err:
            coord.close()
            raise NoMajority(f"candidate slot {candidate} of epoch {epoch} lost after joining it: {err}") from None
        coord.close()
        raise NoMajority(
            f"joined candidate slot {candidate} for epoch {epoch}, which found no majority within "
            f"{election_timeout_s(cfg):g}s"
        )
    raise NoMajority(f"no candidate of epoch {epoch} reached")


def _stand(
    access: Access,
    me: Join,
    lost: int,
    epoch: int,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> tuple[Coordinator, bool, Takeover]:
    topo, cfg = access.topo, access.cfg
    coord = Coordinator.open(access, coordinator=topo.slot, epoch=epoch, connect_timeout_s=cfg.node_lease_s)
    coord.join(join_to_store(me))
    deadline = clock() + election_timeout_s(cfg)
    while True:
        joins = {s: join_from_store(v) for s, v in coord.joins(range(topo.slots)).items()}
        won, why = election.has_quorum(joins, topo.slots)
        if won:
            break
        if clock() > deadline:
            coord.close()
            raise NoMajority(f"stood for epoch {epoch}: {why} within {election_timeout_s(cfg):g}s")
        sleep(cfg.poll_interval_s / 2)
    print(
        f"resilient: slot {topo.slot}: coordinator of epoch {epoch}: slots {sorted(joins)} joined ({why})",
        file=sys.stderr,
    )
    takeover = election.merge(joins)
    reason = f"coordinator slot {lost} ({takeover.roster.name(lost)}) lost"
    takeover = dataclasses.replace(takeover, roster=rosters.take_over(takeover.roster, topo.slot, lost, reason))
    # What the joiners continue from, then the roster that tells them the election is over.
    coord.store.set(FAILOVER_KEY, _takeover_to_store(takeover))
    coord.publish_roster(takeover.roster)
    return coord, True, takeover


def _takeover_to_store(t: Takeover) -> dict[str, int]:
    """What the joiners continue from; the roster goes separately (its publication ends the election) and
    the stop request is in the store already."""
    return {
        "attempt": t.attempt,
        "restarts": t.restarts,
        "no_progress_streak": t.no_progress_streak,
        "first_attempt": t.first_attempt,
    }


def _takeover_from_store(v: dict[str, Any], roster: Roster) -> Takeover:
    return Takeover(
        int(v["attempt"]), roster, int(v["restarts"]), int(v["no_progress_streak"]), int(v["first_attempt"]), None
    )
