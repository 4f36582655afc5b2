"""The lease, election and replacement decisions, as pure functions with injected time, and the
election protocol between real store servers on threads (no processes)."""

from __future__ import annotations

import itertools
import os
import threading
from dataclasses import dataclass, field

import pytest

from resilient.config import load_config
from resilient.core.outcome import Outcome
from resilient.supervisor import election, failover
from resilient.supervisor import roster as rosters
from resilient.supervisor.auth import Sealer
from resilient.supervisor.coordination import Access
from resilient.supervisor.decisions import AttemptContext, NodeFaultKind, decide_attempt
from resilient.supervisor.election import Join
from resilient.supervisor.failover import NoMajority
from resilient.supervisor.leases import LeaseTable, lease_expired, read_every, renew_every
from resilient.supervisor.lost_slots import LostSlots
from resilient.supervisor.reports import NodeOutcome, NodeReport, StopKind, StopRequest
from resilient.supervisor.topology import Topology

CFG = load_config(None, ["supervisor.max_restarts=2", "supervisor.node_lease_s=4"]).supervisor


# -- leases ----------------------------------------------------------------------------------------


def test_a_lease_expires_when_its_number_stops_changing_on_the_readers_clock():
    table = LeaseTable(range(3), lease_s=4.0, join_s=30.0, now=100.0)
    for t in (101.0, 102.0, 103.0):
        for slot in range(3):
            table.observe(slot, {"seq": int(t), "pid": 7}, t)
    table.observe(1, {"seq": 103, "pid": 7}, 106.0)  # read again, not renewed: the clock of the change counts
    assert table.lost(range(3), 107.0) == {}
    lost = table.lost(range(3), 107.5)
    assert set(lost) == {0, 1, 2} and "4.5s" in lost[1]
    table.observe(0, {"seq": 104, "pid": 7}, 107.6)  # renewed: live again
    assert set(table.lost(range(3), 107.7)) == {1, 2} and table.value(0)["seq"] == 104


def test_a_slot_never_heard_from_gets_the_join_time_not_the_lease():
    table = LeaseTable(range(2), lease_s=4.0, join_s=30.0, now=0.0)
    table.observe(0, {"seq": 1}, 1.0)
    table.observe(1, None, 1.0)  # absent: not started yet
    assert table.lost(range(2), 20.0) == {0: "lease not renewed for 19.0s (node_lease_s 4)"}
    assert table.lost(range(2), 31.0)[1] == "no lease within 30s of the start"


def test_lease_boundary_and_renewal_period():
    assert lease_expired(10.0, 14.0, 4.0)[0] is False
    assert lease_expired(10.0, 14.01, 4.0)[0] is True
    assert renew_every(4.0) == 1.0  # four renewals per lease: one late renewal never expires a live node
    assert read_every(4.0) == 0.5  # the coordinator reads and judges every lease twice per renewal


@pytest.mark.parametrize("phase", [0.0, 0.13, 0.37, 0.5, 0.71, 0.99])
def test_a_silent_slot_is_noticed_within_the_lease_plus_two_reads(phase):
    """The coordinator's cadence (read every lease, judge) against a slot that renews every second and goes
    silent at t=10 + `phase`: noticed no earlier than the lease after its last renewal, and no later than
    the lease plus two read periods after it went silent (the bench's detection goal is <= 5 s at 4 s)."""
    lease, read = 4.0, read_every(4.0)
    silent_at = 10.0 + phase
    renewals = [r * renew_every(lease) + 0.3 for r in range(20)]  # an offset of its own
    table = LeaseTable([1], lease_s=lease, join_s=30.0, now=0.0)
    t, noticed = 0.0, None
    while noticed is None and t < 30:
        t += read
        seq = len([r for r in renewals if r <= min(t, silent_at)])
        table.observe(1, {"seq": seq}, t)
        if table.lost([1], t):
            noticed = t
    last_renewal = max(r for r in renewals if r <= silent_at)
    assert noticed is not None and last_renewal + lease < noticed <= silent_at + lease + 2 * read


class _Leases:
    """A lease table's answer at each look: slot -> why it expired."""

    def __init__(self) -> None:
        self.expired: dict[int, str] = {}

    def lost(self, slots: list[int], now: float) -> dict[int, str]:
        return {s: w for s, w in self.expired.items() if s in slots}


def test_lost_slots_look_once_per_read_and_end_each_attempt_once():
    """The coordinator's record of lost slots, as the daemon and the simulator keep it: one look per read
    period, a lost node rank ends an attempt once, its report is no longer waited for, a lost spare leaves."""
    roster = rosters.initial(3, 5)  # slots 0..2 run node ranks 0..2, slots 3 and 4 are spares
    leases, lost = _Leases(), LostSlots(lease_s=4.0)
    assert lost.look(0.0, roster, 0, 5, leases, {}) is not None
    assert lost.look(0.1, roster, 0, 5, leases, {}) is None  # within the read period: no look
    leases.expired = {2: "lease not renewed for 4.1s", 4: "lease not renewed for 4.2s"}
    found = lost.look(0.5, roster, 0, 5, leases, {3: "gpu lost"})
    assert found is not None and found.quorum
    assert found.newly_lost == {2: "lease not renewed for 4.1s", 4: "lease not renewed for 4.2s"}
    assert found.gone_spares == {3: "gpu lost", 4: "lease not renewed for 4.2s"}
    again = lost.look(1.0, roster, 0, 5, leases, {})
    assert again is not None and again.newly_lost == {}  # lost once for the allocation
    assert lost.node_ranks(roster) == {2: "lease not renewed for 4.1s"}
    assert lost.waiting_for(roster, {0: "report"}) == [1]  # node rank 2's report never comes
    assert lost.live(roster) == [0, 1, 3]
    assert [lost.first_post(7, 2), lost.first_post(7, 2), lost.first_post(8, 2)] == [True, False, True]
    leases.expired = {1: "x", 2: "y", 3: "z", 4: "w"}
    with pytest.raises(NoMajority, match="without a majority"):
        lost.look(1.5, roster, 0, 5, leases, {})


def test_a_new_coordinator_starts_from_the_one_it_replaced_and_looks_at_once():
    roster = rosters.initial(2, 3)
    lost = LostSlots(lease_s=4.0)
    lost.look(0.0, roster, 1, 3, _Leases(), {})
    lost.first_post(5, 1)
    lost.after_election(0, "coordinator slot 0 lost")
    assert lost.lost == {0: "coordinator slot 0 lost"}
    assert lost.first_post(5, 1)  # a new epoch's record starts empty
    assert lost.look(0.01, roster, 1, 3, _Leases(), {}) is not None


@dataclass
class _Node:
    slot: int = 2
    attempt: int = 9
    roster: rosters.Roster = field(default_factory=lambda: rosters.initial(2, 3))
    restarts: int = 3
    no_progress_streak: int = 1
    first_attempt: int = 4


def test_a_join_carries_a_supervisors_standing_and_a_takeover_sets_it():
    node = _Node()
    stop = {"kind": "preempted"}
    assert Join.of(node, stop) == Join(2, 9, node.roster, 3, 1, 4, stop)
    newer, _, _ = rosters.replace_nodes(node.roster, {1: "lost"})
    election.Takeover(11, newer, 5, 0, 2, None).carry_on(node)
    assert (node.attempt, node.roster, node.restarts, node.no_progress_streak, node.first_attempt) == (
        11,
        newer,
        5,
        0,
        2,
    )


# -- election --------------------------------------------------------------------------------------


def test_majority_of_the_allocation_and_no_two_disjoint_majorities():
    assert [election.majority(n) for n in range(1, 7)] == [1, 2, 2, 3, 3, 4]
    for slots in range(1, 8):
        for split in itertools.product((0, 1, 2), repeat=slots):  # every partition into three sides
            sides = [[s for s in range(slots) if split[s] == side] for side in range(3)]
            winners = [side for side in sides if election.has_quorum(side, slots)[0]]
            assert len(winners) <= 1, (slots, sides)


def test_candidates_are_the_members_lowest_first_without_the_lost():
    r = rosters.initial(2, 4, ["n0", "n1", "n2", "n3"])
    r, _, _ = rosters.replace_nodes(r, {1: "lost"})  # slot 1 out, slot 2 runs node rank 1
    assert election.candidates(r, [0]) == [2, 3]
    assert election.candidates(r, []) == [0, 2, 3]


def test_merge_takes_the_newest_roster_the_furthest_attempt_and_any_stop():
    old = rosters.initial(2, 3)
    new, _, _ = rosters.replace_nodes(old, {1: "unhealthy"})
    stop = {"kind": "preempted", "reason": "x", "node": 2, "pid": 1, "host": "n2"}
    joins = {1: Join(1, 7, old, 3, 1, 2), 2: Join(2, 8, new, 4, 0, 2, stop)}
    t = election.merge(joins)
    assert (t.attempt, t.roster, t.restarts, t.no_progress_streak, t.first_attempt, t.stop) == (8, new, 4, 1, 2, stop)


# -- the roster ------------------------------------------------------------------------------------


def test_a_spare_takes_the_failed_nodes_rank_and_the_failed_slot_goes_out():
    r = rosters.initial(2, 4, ["n0", "n1", "n2", "n3"])
    assert (r.nodes, r.spares, r.role(2), r.node_rank(1)) == ((0, 1), (2, 3), rosters.Role.SPARE, 1)
    r2, done, why = rosters.replace_nodes(r, {0: "lost: lease"})
    assert r2.nodes == (2, 1) and r2.spares == (3,) and r2.out == ((0, "lost: lease"),) and r2.version == 1
    assert done[0] == rosters.Replacement(0, 0, 2, "lost: lease") and "n2 (slot 2) replaces n0 (slot 0)" in why
    assert r2.role(0) is rosters.Role.OUT and r2.node_rank(2) == 0 and r2.why_out(0) == "lost: lease"
    with pytest.raises(ValueError):
        rosters.replace_nodes(r2, {0: "a", 1: "b"})  # two faults, one spare
    r3 = rosters.drop_spares(r2, {3: "unhealthy: gpu", 1: "not a spare"})
    assert r3.spares == () and r3.nodes == (2, 1) and r3.out[-1] == (3, "unhealthy: gpu")
    r4 = rosters.take_over(r3, 1, 2, "coordinator lost")
    assert (r4.epoch, r4.coordinator, r4.nodes) == (1, 1, (2, 1))  # its node rank is the decision's to replace
    assert rosters.from_store(rosters.to_store(r4)) == r4


# -- the replacement decision ------------------------------------------------------------------------


def _ctx(nnodes=2, *, spares=0, lost=None, restarts=0, streak=0, stop=None):
    return AttemptContext(
        nnodes=nnodes,
        restarts_done=restarts,
        no_progress_streak=streak,
        train_steps=100,
        stop=stop,
        newest_committed=None,
        lost=lost or {},
        spares=spares,
    )


def test_a_lost_node_is_replaced_at_once_without_waiting_for_its_report_or_spending_the_budget():
    reports = {0: NodeReport(0, NodeOutcome.FAILED, 10, 10)}  # no progress, budget spent: a crash would stop
    d = decide_attempt(reports, _ctx(spares=1, lost={1: "lease not renewed for 4.1s"}, restarts=2, streak=2), CFG)
    assert d.restart and d.replace and d.backoff_s == 0.0 and d.no_progress_streak == 2
    assert [(f.node, f.kind) for f in d.faulty_nodes] == [(1, NodeFaultKind.LOST)]
    assert "replace node 1 (lost)" in d.reason


def test_without_a_spare_a_lost_node_stops_the_run_naming_it_and_an_unhealthy_one_wins():
    d = decide_attempt({0: NodeReport(0, NodeOutcome.FAILED, 10, 12)}, _ctx(lost={1: "lease expired"}), CFG)
    assert d.outcome is Outcome.COORDINATION_LOST and not d.replace and "node 1: lease expired" in d.reason
    reports = {0: NodeReport(0, NodeOutcome.UNHEALTHY, 10, 12, "node n0: xid 79")}
    d = decide_attempt(reports, _ctx(lost={1: "lease expired"}), CFG)
    assert d.outcome is Outcome.UNHEALTHY and d.reason == "node n0: xid 79"  # requeued without n0


def test_an_unhealthy_and_a_missing_node_each_take_a_spare_and_more_faults_than_spares_stop():
    reports = {0: NodeReport(0, NodeOutcome.FAILED, 10, 12), 1: NodeReport(1, NodeOutcome.UNHEALTHY, 10, 12, "xid")}
    assert decide_attempt(reports, _ctx(nnodes=3, spares=2), CFG).replace  # node 1 unhealthy, node 2 missing
    short = decide_attempt(reports, _ctx(nnodes=3, spares=1), CFG)
    assert short.outcome is Outcome.UNHEALTHY and "(2 faulty node(s), 1 spare(s))" in short.reason


def test_a_stop_request_wins_over_a_replacement():
    stop = StopRequest(StopKind.PREEMPTED, "SIGUSR2", 0, 1, "n0")
    reports = {0: NodeReport(0, NodeOutcome.PREEMPTED, 10, 12)}
    d = decide_attempt(reports, _ctx(spares=1, lost={1: "lease"}, stop=stop), CFG)
    assert d.outcome is Outcome.PREEMPTED and not d.replace  # saved and requeued; the bad-node ledger has it


def test_a_finished_attempt_with_a_lost_node_is_not_finished():
    reports = {0: NodeReport(0, NodeOutcome.FINISHED, 90, 100)}
    d = decide_attempt(reports, _ctx(spares=1, lost={1: "lease"}), CFG)
    assert d.restart and d.replace


# -- the election protocol, between real stores ------------------------------------------------------


def _topo(slot: int, slots: int, port: int) -> Topology:
    return Topology(slot, slots, ("127.0.0.1",) * slots, port, f"n{slot}", "test")


def _forged(key: str, reason: str) -> None:
    raise AssertionError(f"forged {key}: {reason}")


def test_survivors_elect_the_lowest_live_member_and_a_lone_survivor_stops(tmp_path):
    cfg = load_config(None, ["supervisor.node_lease_s=0.5", "supervisor.poll_interval_s=0.05"]).supervisor
    sealer = Sealer(os.urandom(32), "test")
    base = 20000 + os.getpid() % 20000  # epoch 1 listens on base + 1
    results: dict[int, tuple] = {}

    def survivor(slot: int, roster: rosters.Roster) -> None:
        me = Join(slot, 5 + slot % 2, roster, 1, 0, 0)  # slot 3 had moved on to attempt 6 already
        try:
            coord, won, takeover = failover.elect(
                Access(_topo(slot, roster.slots, base), cfg, sealer, _forged), me, lost=0
            )
            results[slot] = ("coordinator" if won else "member", coord, takeover)
        except failover.NoMajority as err:
            results[slot] = ("minority", str(err), None)

    four = rosters.initial(2, 4)
    threads = [threading.Thread(target=survivor, args=(s, four)) for s in (1, 2, 3)]  # slot 0 coordinated: lost
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert [results[s][0] for s in (1, 2, 3)] == ["coordinator", "member", "member"]
        assert {results[s][1].address for s in (1, 2, 3)} == {f"127.0.0.1:{base + 1}"}
        for s in (1, 2, 3):  # everyone continues from the same state: the furthest attempt, the new roster
            t = results[s][2]
            assert (t.attempt, t.roster.epoch, t.roster.coordinator, t.roster.nodes) == (6, 1, 1, (0, 1))
    finally:
        for s in (3, 2, 1):
            results[s][1].close()

    results.clear()
    lone = threading.Thread(target=survivor, args=(2, rosters.initial(2, 3)))  # 1 of 3 survives: no majority
    lone.start()
    lone.join(30)
    assert results[2][0] == "minority" and "only 1 of 3 slots" in results[2][1]
