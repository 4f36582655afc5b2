"""Scale simulation: many supervisors' coordination on threads of a few processes, against real stores.

Each simulated slot runs the supervisor's cycle (the coordinator's plan, barrier, watch, report, the
coordinator's decision, status merge) through the same Coordinator, typed reports, roster, lease table
(`Liveness`, one lease thread and connection per slot), `LostSlots`, `decisions.decide_attempt`,
`failover.elect` and status functions as resilient/supervisor/daemon.py; only the rank processes are
replaced by fake ranks that step on the clock (they save nothing: `newest_committed` stands for the run's
checkpoints). Slot 0 hosts the first store in a worker process of its own, so that freezing it (SIGSTOP)
is what a frozen host is: its store stops answering, its lease stops. bench/scale/run.py drives it for
2..1024 slots, tests/supervisor/test_scale_sim.py at 64.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from resilient.core import kvstore
from resilient.core.outcome import Outcome
from resilient.supervisor import decisions, failover, publishing
from resilient.supervisor import roster as rosters
from resilient.supervisor.auth import Sealer
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.coordination import Access, CoordinationLost, Coordinator, Gate, intervals
from resilient.supervisor.decisions import AttemptContext, AttemptDecision
from resilient.supervisor.election import Join
from resilient.supervisor.liveness import Liveness
from resilient.supervisor.lost_slots import LostSlots
from resilient.supervisor.reports import NodeOutcome, NodeReport, StopKind
from resilient.supervisor.roster import Role, Roster
from resilient.supervisor.states import State
from resilient.supervisor.topology import Topology

T = TypeVar("T")

# Every simulated slot connects from 127.0.0.1, where real nodes each have an address of their own: the
# store's cap on pending handshakes per address (one host must not take every pending place) would count
# the whole allocation as one host. Here it is the cap on all pending handshakes.
kvstore._MAX_PENDING_PER_PEER = kvstore._MAX_PENDING


@dataclass
class Marks:
    """When each slot crossed each point (monotonic seconds), written by the slot threads."""

    stopped: dict[tuple[int, int], float] = field(default_factory=dict)
    """(attempt, slot) -> this slot's ranks were stopped (a spare: it saw the attempt end)."""
    past_barrier: dict[tuple[int, int], float] = field(default_factory=dict)
    """(attempt, slot) -> this slot passed the attempt's barrier (its ranks would spawn now; a spare: it has
    the attempt's plan)."""
    decided: dict[int, float] = field(default_factory=dict)
    """attempt -> the coordinator published its decision."""
    elected: dict[int, float] = field(default_factory=dict)
    """epoch -> its coordinator won the election."""
    exits: dict[int, Outcome | str] = field(default_factory=dict)
    """slot -> how its supervisor ended (the outcome, or the exception)."""

    def update(self, other: Marks) -> None:
        for name in ("stopped", "past_barrier", "decided", "elected", "exits"):
            getattr(self, name).update(getattr(other, name))


class SimNode(threading.Thread):
    """One supervisor's coordination with `ranks` fake ranks; `fail()`, `signal()`, `freeze()` inject events."""

    def __init__(
        self,
        topo: Topology,
        nodes: int,
        cfg: SupervisorConfig,
        sealer: Sealer,
        ranks: int,
        step_s: float,
        marks: Marks,
        run_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name=f"sim-slot-{topo.slot}", daemon=True)
        self.topo, self.cfg, self.nranks, self.step_s, self.marks = topo, cfg, ranks, step_s, marks
        self.access = Access(topo, cfg, sealer, _forged)
        self.slot, self.slots, self.run_dir, self.clock = topo.slot, topo.slots, run_dir, clock
        self.roster = self.plan = rosters.initial(nodes, topo.slots, topo.hosts)
        self.node: int | None = None
        self.coord: Coordinator | None = None
        self.liveness: Liveness | None = None
        self.attempt = self.first_attempt = 0
        self.state: State | Outcome = State.STARTING
        self.restarts = 0
        self.no_progress_streak = 0
        self.reached_step = 0
        self.train_steps = 10**9
        """The simulated run's final step (it never gets there: the scenario ends it by preemption)."""
        self.save_on_finish = True
        self.newest_committed: int | None = None
        """The newest committed checkpoint step the coordinator would find (the fake ranks save nothing)."""
        self.decisions: list[AttemptDecision] = []
        """The coordinator: its decision for each attempt, in order."""
        self.cpu_s = 0.0
        """This thread's CPU time so far (the coordinator's share of the work, for the bench)."""
        self.lost = LostSlots(cfg.node_lease_s)
        self._start_step = 0
        self._next_status = 0.0
        self._next_merge = 0.0
        self._wake = threading.Event()
        self._fail = threading.Event()
        self._signal = threading.Event()
        self._frozen = threading.Event()

    def fail(self) -> None:
        self._fail.set()
        self._wake.set()

    def signal(self) -> None:
        self._signal.set()
        self._wake.set()

    def freeze(self) -> None:
        """This slot goes silent (a frozen host whose store it does not host): no lease, no store call."""
        self._frozen.set()
        if self.liveness is not None:
            self.liveness.stop()
        self._wake.set()

    # -- the supervisor's cycle ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.marks.exits[self.slot] = self._run()
        except _Frozen:
            self.marks.exits[self.slot] = "frozen"
        except Exception as err:  # recorded for the bench and tests, which check every slot's end
            self.marks.exits[self.slot] = f"{type(err).__name__}: {err}"
        finally:
            if self.liveness is not None:
                self.liveness.stop()

    def _run(self) -> Outcome:
        self.coord = Coordinator.open(self.access, coordinator=0, epoch=0)
        self._start_liveness(self.cfg.store_timeout_s)
        if self.coord.hosting:
            self._set_roster(self.roster)
            self.coord.publish_plan(0, self.roster)
            self.coord.publish_first_attempt(0)
        self.attempt = self._wait(self.coord.first_attempt)
        while True:
            decision = self._attempt_and_decision()
            if decision.outcome is not None:
                self.coord.ack(self.attempt)
                self._set_state(decision.outcome)
                if self.coord.hosting:
                    live = self.lost.live(self.roster)
                    self._wait(lambda live=live: self.coord.all_acked(self.attempt, live))
                return decision.outcome
            self.restarts += 1
            self._set_state(State.BACKOFF)
            self._sleep(decision.backoff_s)
            self.attempt += 1

    def _attempt_and_decision(self) -> AttemptDecision:
        return failover.attempt_then_decision(self._attempt_in_role, self._report, self._decide, self._failover)

    def _attempt_in_role(self) -> NodeOutcome | None:
        self.plan = self._wait(lambda: self.coord.plan(self.attempt))
        if self.plan.version >= self.roster.version:
            self.roster = self.plan
        self.node = self.plan.node_rank(self.slot)
        role = self.plan.role(self.slot)
        if role is Role.OUT:
            raise _Frozen()  # a slot put out of the run leaves (in the simulation: only frozen ones are)
        if role is Role.NODE:
            return self._one_attempt()
        self._stand_by()
        return None

    def _report(self, outcome: NodeOutcome) -> None:
        if self.node is not None:
            self.coord.report(
                self.attempt, NodeReport(self.node, outcome, self._start_step, self.reached_step, slot=self.slot)
            )

    def _one_attempt(self) -> NodeOutcome:
        coord = self.coord
        self._start_step = self.reached_step
        if self.node == 0:
            coord.publish_master_port(self.attempt, 29500 + self.attempt)
        self._set_state(State.WAITING)
        coord.arrive(self.attempt, self.node)
        gate = self._wait(lambda: coord.barrier(self.attempt, self.plan))
        self.marks.past_barrier[(self.attempt, self.slot)] = self.clock()
        if gate is not Gate.GO:
            return self._stop_ranks(NodeOutcome.PREEMPTED if gate is Gate.STOP else NodeOutcome.FAILED)
        coord.master_port(self.attempt)
        spawned = self.clock()
        self._set_state(State.RUNNING)
        next_poll = self.clock() + coord.intervals.poll_s * (self.slot % 64) / 64  # slots start out of phase
        while True:
            now = self.clock()
            self._check_liveness(now)
            self.reached_step = self._start_step + int((now - spawned) / self.step_s)
            if self._fail.is_set():
                self._fail.clear()
                coord.request_restart(
                    self.attempt,
                    kind="rank_exit",
                    rank=self.node * self.nranks,
                    step=self.reached_step,
                    reason="simulated rank failure",
                )
                return self._stop_ranks(NodeOutcome.FAILED)
            if self._signal.is_set():
                self._signal.clear()
                coord.request_stop(StopKind.PREEMPTED, f"node {self.node}: simulated preemption signal")
                return self._stop_ranks(NodeOutcome.PREEMPTED)
            if now >= next_poll:
                next_poll = now + coord.intervals.poll_s
                seen = coord.poll(self.attempt)
                if seen is Gate.STOP:  # as daemon._begin_preempt
                    coord.request_stop(StopKind.PREEMPTED, "stop requested by another supervisor")
                    return self._stop_ranks(NodeOutcome.PREEMPTED)
                if seen is Gate.RESTART:
                    return self._stop_ranks(NodeOutcome.FAILED)
            self._maybe_publish_status()
            self._wake.wait(max(0.0, min(next_poll, self._next_status) - self.clock()))
            self._wake.clear()

    def _stand_by(self) -> None:
        """A spare's attempt: until the decision is out (the coordinator: until every report is in)."""
        self._set_state(State.STANDBY)
        self.marks.past_barrier[(self.attempt, self.slot)] = self.clock()
        self._wait(
            lambda: (
                (True if self._reports_ready() is not None else None)
                if self.coord.hosting
                else (True if self.coord.decision(self.attempt) is not None else None)
            )
        )
        self.marks.stopped[(self.attempt, self.slot)] = self.clock()
        return None

    def _stop_ranks(self, outcome: NodeOutcome) -> NodeOutcome:
        self.marks.stopped[(self.attempt, self.slot)] = self.clock()  # fake ranks stop at once
        self._set_state(State.STOPPING)
        return outcome

    # -- the coordinator, as daemon.Supervisor's ----------------------------------------------------

    def _check_liveness(self, now: float) -> None:
        if self._frozen.is_set():
            raise _Frozen()
        if self.liveness is not None and self.liveness.failed is not None:
            raise CoordinationLost(f"coordinator slot {self.roster.coordinator} lost: {self.liveness.failed}")
        if not self.coord.hosting:
            return
        found = self.lost.look(now, self.roster, self.slot, self.slots, self.liveness, {})
        if found is None:
            return
        for slot, reason in found.newly_lost.items():
            node = self.plan.node_rank(slot)
            if node is not None and self.lost.first_post(self.attempt, slot):
                self.coord.request_restart(
                    self.attempt,
                    kind="node_lost",
                    rank=None,
                    step=self.reached_step,
                    reason=f"node {node} (slot {slot}) lost: {reason}",
                    culprit_slot=slot,
                )
        if found.gone_spares:
            self._set_roster(rosters.drop_spares(self.roster, found.gone_spares))

    def _reports_ready(self) -> dict[int, NodeReport] | None:
        self._check_liveness(self.clock())
        got = self.coord.reports(self.attempt, self.plan, range(len(self.plan.nodes)))
        return None if self.lost.waiting_for(self.plan, got) else got

    def _decide(self) -> AttemptDecision:
        self._set_state(State.DECIDING)
        if self.coord.hosting and self.coord.decision(self.attempt) is None:
            decision = self.decide(self._wait(self._reports_ready))
            if decision.restart:
                roster = self.roster
                if decision.replace:
                    roster, _, _ = rosters.replace_nodes(roster, {f.node: f.reason for f in decision.faulty_nodes})
                self._set_roster(roster)
                self.coord.publish_plan(self.attempt + 1, self.roster)
            self.coord.publish_decision(self.attempt, decision)
            self.marks.decided[self.attempt] = self.clock()
        return self._wait(lambda: self.coord.decision(self.attempt))

    def decide(self, reports: dict[int, NodeReport]) -> AttemptDecision:
        """The coordinator's decision, from what it knows as the daemon's coordinator does (the store's stop
        request, the newest committed step, lost nodes, spares); the daemon records it in the ledger, the
        simulation only carries the streak."""
        context = AttemptContext(
            nnodes=len(self.plan.nodes),
            restarts_done=self.restarts,
            no_progress_streak=self.no_progress_streak,
            train_steps=self.train_steps,
            stop=self.coord.stop_requested(),
            newest_committed=self.newest_committed,
            save_on_finish=self.save_on_finish,
            lost=self.lost.node_ranks(self.plan),
            spares=len(self.roster.spares),
        )
        decision = decisions.decide_attempt(reports, context, self.cfg)
        self.no_progress_streak = decision.no_progress_streak
        self.decisions.append(decision)
        return decision

    def _set_roster(self, roster: Roster) -> None:
        self.roster = roster
        self.coord.publish_roster(roster)

    def _start_liveness(self, join_s: float) -> None:
        store = self.coord.second_connection(self.access)
        self.liveness = Liveness(
            store,
            self.slot,
            self.slots,
            self.cfg.node_lease_s,
            read_all=self.coord.hosting,
            join_s=join_s,
            value=lambda: {"host": self.topo.node_name, "node": self.node},
            clock=self.clock,
        ).start()

    def _failover(self, err: CoordinationLost) -> None:
        """As daemon.Supervisor._failover: stop, elect, continue on the new coordinator's store."""
        lost = self.roster.coordinator
        self.marks.stopped.setdefault((self.attempt, self.slot), self.clock())  # fake ranks stop at once
        self.liveness.stop()
        self.coord.close()
        self._set_state(State.ELECTING, publish=False)
        me = Join.of(self, self.coord.stop_record())
        self.coord, won, takeover = failover.elect(self.access, me, lost, clock=self.clock)
        takeover.carry_on(self)
        self.plan = self.roster
        self._start_liveness(failover.election_timeout_s(self.cfg))
        if won:
            self.marks.elected[self.roster.epoch] = self.clock()
            self.lost.after_election(lost, str(err))
            if takeover.stop is not None:
                self.coord.adopt_stop(dict(takeover.stop))
            self.coord.publish_first_attempt(takeover.first_attempt)
            self.coord.publish_plan(self.attempt, self.plan)
        self.node = self.plan.node_rank(self.slot)
        self.lost.look_now()

    # -- status ---------------------------------------------------------------------------------------

    def _set_state(self, state: State | Outcome, publish: bool = True) -> None:
        self.state = state
        self._next_status = self._next_merge = 0.0
        if publish:
            self._maybe_publish_status()

    def _maybe_publish_status(self) -> None:
        now = self.clock()
        if now < self._next_status or self.coord is None:
            return
        self._next_status = now + self.coord.intervals.status_s
        wall = time.time()
        running = self.state is State.RUNNING
        rows = [
            {
                "rank": (self.node or 0) * self.nranks + local,
                "local_rank": local,
                "node": self.node,
                "node_name": self.topo.node_name,
                "pid": 100000 + self.slot * self.nranks + local,
                "phase": "step" if running else "init",
                "step": self.reached_step,
                "last_heartbeat": wall,
                "heartbeat_age_s": 0.0,
                "exit_code": None,
            }
            for local in range(self.nranks if self.node is not None else 0)
        ]  # the shape of publishing.rank_rows
        self.coord.publish_status(
            publishing.node_status(
                self.topo, self.state, rows, None, node=self.node, role=str(self.roster.role(self.slot))
            )
        )
        if self.coord.hosting and self.run_dir is not None and now >= self._next_merge:
            self._next_merge = now + self.coord.intervals.merge_s
            publishing.write_run_status(
                self.run_dir,
                self.coord.node_statuses(),
                state=self.state,
                attempt=self.attempt,
                reached_step=self.reached_step,
                restarts=self.restarts,
                last_failure=None,
                stop=self.coord.stop_requested(),
                roster=self.roster,
                lost=self.lost.lost,
            )
        self.cpu_s = time.thread_time()

    # -- waiting ---------------------------------------------------------------------------------------

    def _wait(self, probe: Callable[[], T | None]) -> T:
        deadline = self.clock() + self.cfg.store_timeout_s
        while True:
            self._check_liveness(self.clock())
            got = probe()
            if got is not None:
                self.cpu_s = time.thread_time()
                return got
            if self.clock() > deadline:
                raise TimeoutError(f"slot {self.slot}: waited {self.cfg.store_timeout_s:g}s in state {self.state}")
            self._maybe_publish_status()
            self._wake.wait(self.coord.wait_s)
            self._wake.clear()

    def _sleep(self, seconds: float) -> None:
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0:
            self._maybe_publish_status()
            time.sleep(min(left, self.coord.intervals.poll_s))


class _Frozen(Exception):
    """The simulated host went silent: its thread ends without a word."""


def _forged(key: str, reason: str) -> None:
    raise AssertionError(f"simulation saw a forged value: {reason}")


def sim_config(**overrides: Any) -> SupervisorConfig:
    return SupervisorConfig(**{"backoff_initial_s": 0.0, "backoff_max_s": 0.0, "store_timeout_s": 120.0, **overrides})


def _worker(
    slots: list[int],
    total: int,
    nodes: int,
    port: int,
    secret: bytes,
    ranks: int,
    step_s: float,
    cfg: dict[str, Any],
    run_dir: Path | None,
    conn,
) -> None:
    """A process of simulated slots, driven over `conn`: ('fail'|'signal'|'freeze', slot), ('ops',), ('cpu',),
    ('marks',), ('decisions', slot), ('join',)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two connections per slot, and a store's clients
    threading.stack_size(512 * 1024)  # hundreds of threads with 8 MiB stacks is a lot of address space
    marks = Marks()
    sealer = Sealer(secret, "sim")
    config = sim_config(**cfg)
    hosts = ("127.0.0.1",) * total
    sims = {
        s: SimNode(
            Topology(s, total, hosts, port, f"sim{s:04d}", "sim"), nodes, config, sealer, ranks, step_s, marks, run_dir
        )
        for s in slots
    }
    for sim in sims.values():
        sim.start()
    while True:
        cmd, *args = conn.recv()
        if cmd in ("fail", "signal", "freeze"):
            getattr(sims[args[0]], cmd)()
            conn.send(None)
        elif cmd == "ops":
            conn.send(
                sum(
                    s.coord.store.ops + (s.liveness.store.ops if s.liveness else 0)
                    for s in sims.values()
                    if s.coord is not None
                )
            )
        elif cmd == "cpu":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(usage.ru_utime + usage.ru_stime)
        elif cmd == "marks":
            conn.send(marks)
        elif cmd == "decisions":
            conn.send([[str(d.outcome or "restart"), d.reason] for d in sims[args[0]].decisions])
        elif cmd == "join":
            for s in sims.values():
                s.join(timeout=30)
            conn.send(
                (
                    marks,
                    {
                        s: [[str(d.outcome or "restart"), d.reason] for d in sim.decisions]
                        for s, sim in sims.items()
                        if sim.decisions
                    },
                )
            )
            return


def _free_pair() -> int:
    """A port p with p and p + 1 free (the first store and the one after an election)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports")


class Cluster:
    """N simulated slots (the last `spares` of them spare nodes): slot 0 alone in a worker process (it hosts
    the first store; freezing it is SIGSTOP), the others as threads of a few worker processes (one
    interpreter for a thousand slots would measure its GIL)."""

    def __init__(
        self,
        slots: int,
        run_dir: Path | None,
        *,
        ranks: int = 8,
        step_s: float = 1.0,
        spares: int = 0,
        workers: int = 0,
        cfg: dict[str, Any] | None = None,
    ) -> None:
        secret = os.urandom(32)
        self.slots, self.run_dir, self.marks = slots, run_dir, Marks()
        port = _free_pair()
        workers = workers or max(1, min(4, slots // 128))
        ctx = multiprocessing.get_context("spawn")
        groups = [[0]] + [list(range(1 + w, slots, workers)) for w in range(workers)]
        self._procs, self._conns, self._home = [], [], {}
        for w, group in enumerate(g for g in groups if g):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_worker,
                args=(group, slots, slots - spares, port, secret, ranks, step_s, cfg or {}, run_dir, theirs),
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
            self._conns.append(ours)
            self._home.update({s: w for s in group})
        self._stopped: set[int] = set()

    def _ask(self, w: int, *cmd: Any) -> Any:
        self._conns[w].send(cmd)
        return self._conns[w].recv()

    def fail(self, slot: int) -> None:
        self._ask(self._home[slot], "fail", slot)

    def signal(self, slot: int) -> None:
        self._ask(self._home[slot], "signal", slot)

    def freeze(self, slot: int) -> None:
        """Slot 0 (the first coordinator): SIGSTOP its process; another slot: it stops renewing and calling."""
        if slot == 0:
            os.kill(self._procs[0].pid, signal.SIGSTOP)
            self._stopped.add(0)
        else:
            self._ask(self._home[slot], "freeze", slot)

    def _live_workers(self) -> list[int]:
        return [w for w in range(len(self._conns)) if w not in self._stopped]

    def ops(self) -> int:
        return sum(self._ask(w, "ops") for w in self._live_workers())

    def cpu(self, w: int) -> float:
        return self._ask(w, "cpu")

    def decisions(self, slot: int) -> list[list[str]]:
        return self._ask(self._home[slot], "decisions", slot)

    def refresh_marks(self) -> Marks:
        """Every slot's marks so far (CLOCK_MONOTONIC is one clock for all processes of this machine)."""
        merged = Marks()
        for w in self._live_workers():
            merged.update(self._ask(w, "marks"))
        self.marks = merged
        return merged

    def wait(self, which: str, keys: list, timeout_s: float) -> float:
        """The latest of the marks `which`[keys] once all are set (raises after `timeout_s`)."""
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [w for w, proc in enumerate(self._procs) if not proc.is_alive()]
            if dead:
                raise RuntimeError(f"simulation worker(s) {dead} died (exit {self._procs[dead[0]].exitcode})")
            everything = self.refresh_marks()
            marks = getattr(everything, which)
            missing = [k for k in keys if k not in marks]
            if not missing:
                return max(marks[k] for k in keys)
            ended = {s: e for s, e in everything.exits.items() if e != "frozen"}
            if ended or time.monotonic() > deadline:  # a slot that ended early holds the others up
                raise TimeoutError(
                    f"{len(missing)} of {len(keys)} {which} marks missing, e.g. {missing[:3]}; "
                    f"slots ended: {dict(list(ended.items())[:3])}"
                )
            time.sleep(0.1)

    def close(self) -> tuple[dict[int, Outcome | str], dict[int, list[list[str]]]]:
        """Wait for every live slot to end; how each ended, and each coordinator's decisions."""
        exits, decisions = {}, {}
        for w in self._live_workers():
            marks, made = self._ask(w, "join")
            exits.update(marks.exits)
            decisions.update(made)
        self.shutdown()
        return exits, decisions

    def shutdown(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join()


def scenario(
    slots: int,
    run_dir: Path,
    steady_s: float,
    *,
    ranks: int = 8,
    spares: int = 1,
    status_probe: Callable[[Path], tuple[float, float]] | None = None,
    cfg: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start N slots (the last `spares` of them spares), measure steady state, then:
    a rank failure on the last node (-> every node restarts), the last node going silent (its lease expires
    -> every node stopped, a spare takes its place), slot 0 -- the coordinator -- going silent (-> the
    survivors elect slot 1, which replaces node 0 with a spare), and a preemption signal on slot N/2 (->
    every slot stops). The figures bench/scale tabulates, plus the coordinators' decisions as [outcome or
    "restart", reason]. Raises unless every live slot ended preempted."""
    if spares < 2 or slots - 2 < slots // 2 + 1:
        raise ValueError(
            "the scenario loses two slots: it needs two spares, and a majority of at least 6 slots left to elect"
        )
    cluster = Cluster(slots, run_dir, ranks=ranks, spares=spares, cfg=cfg)
    nodes = slots - spares
    every = list(range(slots))
    try:
        cluster.wait("past_barrier", [(0, s) for s in every], 300)
        time.sleep(2 * sim_config(**(cfg or {})).status_interval_s)  # every slot has published; slot 0 merged once
        ops0, cpu0, t0 = cluster.ops(), cluster.cpu(0), time.monotonic()
        time.sleep(steady_s)
        ops1, cpu1, t1 = cluster.ops(), cluster.cpu(0), time.monotonic()
        status_wall, status_cpu = status_probe(run_dir) if status_probe else (float("nan"), float("nan"))
        status_kb = (run_dir / "status.json").stat().st_size / 1024

        failed_at = time.monotonic()
        cluster.fail(nodes - 1)
        fail_to_stop = cluster.wait("stopped", [(0, s) for s in every], 60) - failed_at
        decide_to_go = cluster.wait("past_barrier", [(1, s) for s in every], 60) - cluster.marks.decided[0]
        time.sleep(1.0)

        silent = nodes - 1  # node rank nodes-1 on slot nodes-1 goes silent: its lease expires
        frozen_at = time.monotonic()
        cluster.freeze(silent)
        alive = [s for s in every if s != silent]
        lease_to_stop = cluster.wait("stopped", [(1, s) for s in alive], 60) - frozen_at
        lease_to_go = cluster.wait("past_barrier", [(2, s) for s in alive], 60) - frozen_at
        time.sleep(1.0)

        decisions = cluster.decisions(0)
        frozen_at = time.monotonic()
        cluster.freeze(0)  # the coordinator
        alive = [s for s in alive if s != 0]
        elected = cluster.wait("elected", [1], 60) - frozen_at
        election_to_go = cluster.wait("past_barrier", [(3, s) for s in alive], 60) - frozen_at
        time.sleep(1.0)

        signaled_at = time.monotonic()
        cluster.signal(slots // 2)
        preempt_to_stop = cluster.wait("stopped", [(3, s) for s in alive], 60) - signaled_at
        exits, made = cluster.close()
        ends = {e for s, e in exits.items() if s in alive}
        if ends != {Outcome.PREEMPTED}:
            raise RuntimeError(f"{slots} slots ended {sorted(map(str, ends))}")
        decisions += made.get(1, [])
    finally:
        cluster.shutdown()
    return {
        "nodes": slots,
        "ranks": nodes * ranks,
        "ops_per_s": (ops1 - ops0) / (t1 - t0),
        "fail_to_stop_s": fail_to_stop,
        "decide_to_go_s": decide_to_go,
        "lease_to_stop_s": lease_to_stop,
        "lease_to_go_s": lease_to_go,
        "election_s": elected,
        "election_to_go_s": election_to_go,
        "preempt_to_stop_s": preempt_to_stop,
        "status_kb": status_kb,
        "status_cmd_s": status_wall,
        "status_cmd_cpu_s": status_cpu,
        "node0_cpu": (cpu1 - cpu0) / (t1 - t0),
        "lease_s": sim_config(**(cfg or {})).node_lease_s,
        "poll_s": intervals(slots, sim_config(**(cfg or {}))).poll_s,
        "decisions": decisions,
    }
