"""Scale simulation: many supervisors' coordination on threads of a few processes, against one real store.

Each simulated node runs the supervisor's attempt cycle (barrier, watch, report, node 0's decision,
status merge) through the same Coordinator, typed reports, `decisions.decide_attempt` and status
functions as resilient/supervisor/daemon.py; only the rank processes are replaced by fake ranks that
step on the clock (they save nothing: `newest_committed` stands for the run's checkpoints). Node 0
hosts the real TCPStore (bound, sealed) exactly as in a job. bench/scale/run.py drives it for 2..1024
nodes, tests/supervisor/test_scale_sim.py at 64.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from resilient.core.outcome import Outcome
from resilient.supervisor import decisions, publishing
from resilient.supervisor.auth import Sealer
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.coordination import Coordinator, Gate
from resilient.supervisor.decisions import AttemptContext, AttemptDecision
from resilient.supervisor.reports import NodeOutcome, NodeReport, StopKind
from resilient.supervisor.states import State
from resilient.supervisor.topology import Topology

T = TypeVar("T")


@dataclass
class Marks:
    """When each node crossed each point (monotonic seconds), written by the node threads."""

    stopped: dict[tuple[int, int], float] = field(default_factory=dict)
    """(attempt, node) -> this node's ranks were stopped."""
    past_barrier: dict[tuple[int, int], float] = field(default_factory=dict)
    """(attempt, node) -> this node passed the attempt's barrier (its ranks would spawn now)."""
    decided: dict[int, float] = field(default_factory=dict)
    """attempt -> node 0 published its decision."""
    exits: dict[int, Outcome | str] = field(default_factory=dict)
    """node -> how its supervisor ended (the outcome, or the exception)."""


class SimNode(threading.Thread):
    """One supervisor's coordination with `ranks` fake ranks; `fail()` and `signal()` inject events."""

    def __init__(self, coord: Coordinator, cfg: SupervisorConfig, ranks: int, step_s: float, marks: Marks,
                 run_dir: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name=f"sim-node-{coord.node}", daemon=True)
        self.coord, self.cfg, self.nranks, self.step_s, self.marks = coord, cfg, ranks, step_s, marks
        self.node, self.nnodes, self.run_dir, self.clock = coord.node, coord.nnodes, run_dir, clock
        self.topo = Topology(self.node, self.nnodes, "127.0.0.1", 0, f"sim{self.node:04d}", "sim")
        self.attempt = 0
        self.state: State | Outcome = State.STARTING
        self.restarts = 0
        self.no_progress_streak = 0
        self.reached_step = 0
        self.train_steps = 10**9
        """The simulated run's final step (it never gets there: the scenario ends it by preemption)."""
        self.save_on_finish = True
        self.newest_committed: int | None = None
        """The newest committed checkpoint step node 0 would find (the fake ranks save nothing)."""
        self.decisions: list[AttemptDecision] = []
        """Node 0: its decision for each attempt, in order."""
        self.cpu_s = 0.0
        """This thread's CPU time so far (node 0's share of the work, for the bench)."""
        self._start_step = 0
        self._next_status = 0.0
        self._next_merge = 0.0
        self._wake = threading.Event()
        self._fail = threading.Event()
        self._signal = threading.Event()

    def fail(self) -> None:
        self._fail.set()
        self._wake.set()

    def signal(self) -> None:
        self._signal.set()
        self._wake.set()

    # -- the supervisor's cycle ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.marks.exits[self.node] = self._run()
        except Exception as err:  # recorded for the bench and tests, which check every node's end
            self.marks.exits[self.node] = f"{type(err).__name__}: {err}"

    def _run(self) -> Outcome:
        coord = self.coord
        if self.node == 0:
            coord.publish_first_attempt(0)
        self.attempt = self._wait(coord.first_attempt)
        while True:
            end = self._one_attempt()
            coord.report(self.attempt, NodeReport(self.node, end, self._start_step, self.reached_step))
            self._set_state(State.DECIDING)
            if self.node == 0:
                coord.publish_decision(self.attempt, self.decide(self._wait(lambda: coord.all_reports(self.attempt))))
                self.marks.decided[self.attempt] = self.clock()
            decision = self._wait(lambda: coord.decision(self.attempt))
            if decision.outcome is not None:
                coord.ack(self.attempt)
                self._set_state(decision.outcome)
                if self.node == 0:
                    self._wait(lambda: coord.all_acked(self.attempt))
                return decision.outcome
            self.restarts += 1
            self._set_state(State.BACKOFF)
            self._sleep(decision.backoff_s)
            self.attempt += 1

    def _one_attempt(self) -> NodeOutcome:
        coord = self.coord
        self._start_step = self.reached_step
        if self.node == 0:
            coord.publish_master_port(self.attempt, 29500 + self.attempt)
        self._set_state(State.WAITING)
        coord.arrive(self.attempt)
        gate = self._wait(lambda: coord.barrier(self.attempt))
        self.marks.past_barrier[(self.attempt, self.node)] = self.clock()
        if gate is not Gate.GO:
            return self._stop_ranks(NodeOutcome.PREEMPTED if gate is Gate.STOP else NodeOutcome.FAILED)
        coord.master_port(self.attempt)
        self._spawned = self.clock()
        self._set_state(State.RUNNING)
        next_poll = self.clock() + coord.intervals.poll_s * (self.node % 64) / 64  # nodes start out of phase
        while True:
            now = self.clock()
            self.reached_step = self._start_step + int((now - self._spawned) / self.step_s)
            if self._fail.is_set():
                self._fail.clear()
                coord.request_restart(self.attempt, kind="rank_exit", rank=self.node * self.nranks,
                                      step=self.reached_step, reason="simulated rank failure")
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

    def _stop_ranks(self, outcome: NodeOutcome) -> NodeOutcome:
        self.marks.stopped[(self.attempt, self.node)] = self.clock()  # fake ranks stop at once
        self._set_state(State.STOPPING)
        return outcome

    def decide(self, reports: dict[int, NodeReport]) -> AttemptDecision:
        """Node 0's decision, from what it knows as the daemon's node 0 does (the store's stop request, the
        newest committed step); the daemon records it in the ledger, the simulation only carries the streak."""
        context = AttemptContext(nnodes=self.nnodes, restarts_done=self.restarts,
                                 no_progress_streak=self.no_progress_streak, train_steps=self.train_steps,
                                 stop=self.coord.stop_requested(), newest_committed=self.newest_committed,
                                 save_on_finish=self.save_on_finish)
        decision = decisions.decide_attempt(reports, context, self.cfg)
        self.no_progress_streak = decision.no_progress_streak
        self.decisions.append(decision)
        return decision

    # -- status ---------------------------------------------------------------------------------------

    def _set_state(self, state: State | Outcome) -> None:
        self.state = state
        self._next_status = self._next_merge = 0.0
        self._maybe_publish_status()

    def _maybe_publish_status(self) -> None:
        now = self.clock()
        if now < self._next_status:
            return
        self._next_status = now + self.coord.intervals.status_s
        wall = time.time()
        running = self.state is State.RUNNING
        rows = [{"rank": self.node * self.nranks + local, "local_rank": local, "node": self.node,
                 "node_name": self.topo.node_name, "pid": 100000 + self.node * self.nranks + local,
                 "phase": "step" if running else "init", "step": self.reached_step,
                 "last_heartbeat": wall, "heartbeat_age_s": 0.0, "exit_code": None}
                for local in range(self.nranks)]  # the shape of publishing.rank_rows
        self.coord.publish_status(publishing.node_status(self.topo, self.state, rows, None))
        if self.node == 0 and self.run_dir is not None and now >= self._next_merge:
            self._next_merge = now + self.coord.intervals.merge_s
            publishing.write_run_status(self.run_dir, self.coord.node_statuses(), state=self.state,
                                        attempt=self.attempt, reached_step=self.reached_step,
                                        restarts=self.restarts, last_failure=None, stop=self.coord.stop_requested())
        self.cpu_s = time.thread_time()

    # -- waiting ---------------------------------------------------------------------------------------

    def _wait(self, probe: Callable[[], T | None]) -> T:
        deadline = self.clock() + self.cfg.store_timeout_s
        while (got := probe()) is None:
            if self.clock() > deadline:
                raise TimeoutError(f"node {self.node}: waited {self.cfg.store_timeout_s:g}s in state {self.state}")
            self._maybe_publish_status()
            self._wake.wait(self.coord.wait_s)
            self._wake.clear()
        self.cpu_s = time.thread_time()
        return got

    def _sleep(self, seconds: float) -> None:
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0:
            self._maybe_publish_status()
            time.sleep(min(left, self.coord.intervals.poll_s))


def _forged(key: str, reason: str) -> None:
    raise AssertionError(f"simulation saw a forged value: {reason}")


def _sim_config() -> SupervisorConfig:
    return SupervisorConfig(backoff_initial_s=0.0, backoff_max_s=0.0, store_timeout_s=120.0)


def _start_nodes(numbers: list[int], nnodes: int, port: int, sealer: Sealer, marks: Marks, ranks: int,
                 step_s: float) -> list[SimNode]:
    threading.stack_size(512 * 1024)  # hundreds of threads with 8 MiB stacks is a lot of address space
    nodes = []
    for n in numbers:
        topo = Topology(n, nnodes, "127.0.0.1", port, f"sim{n:04d}", "sim")
        nodes.append(SimNode(Coordinator.open(topo, _sim_config(), sealer, _forged), _sim_config(), ranks, step_s,
                             marks))
    for node in nodes:
        node.start()
    return nodes


def _worker(numbers: list[int], nnodes: int, port: int, secret: bytes, ranks: int, step_s: float, conn) -> None:
    """A process of simulated nodes, driven over `conn`: ('fail'|'signal', node), ('ops',), ('marks',), ('join',)."""
    marks = Marks()
    nodes = {node.node: node for node in _start_nodes(numbers, nnodes, port, Sealer(secret, "sim"), marks, ranks,
                                                      step_s)}
    while True:
        cmd, *args = conn.recv()
        if cmd in ("fail", "signal"):
            getattr(nodes[args[0]], cmd)()
            conn.send(None)
        elif cmd == "ops":
            conn.send(sum(n.coord.store.ops for n in nodes.values()))
        elif cmd == "marks":
            conn.send(marks)
        elif cmd == "join":
            for n in nodes.values():
                n.join(timeout=10)
            conn.send(marks)
            return


class Cluster:
    """N simulated nodes: node 0 (this process) hosts the sealed store on 127.0.0.1; the others run as
    threads of a few worker processes (one interpreter for a thousand nodes would measure its GIL)."""

    def __init__(self, nnodes: int, run_dir: Path, *, ranks: int = 8, step_s: float = 1.0, workers: int = 0) -> None:
        secret = os.urandom(32)
        self.nnodes, self.run_dir, self.marks = nnodes, run_dir, Marks()
        before = set(os.listdir("/proc/self/task"))
        cfg = _sim_config()
        coord0 = Coordinator.open(Topology(0, nnodes, "127.0.0.1", 0, "sim0000", "sim"), cfg, Sealer(secret, "sim"),
                                  _forged)
        self.server_threads = sorted(int(t) for t in set(os.listdir("/proc/self/task")) - before)
        self.node0 = SimNode(coord0, cfg, ranks, step_s, self.marks, run_dir)
        self.node0.start()
        workers = workers or max(1, min(4, nnodes // 128))
        ctx = multiprocessing.get_context("spawn")  # this process already runs threads (the store server)
        self._procs, self._conns, self._home = [], [], {}
        for w in range(workers):
            numbers = list(range(1 + w, nnodes, workers))
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(numbers, nnodes, coord0.port, secret, ranks, step_s, theirs),
                               daemon=True)
            proc.start()
            self._procs.append(proc)
            self._conns.append(ours)
            self._home.update({n: w for n in numbers})

    def _ask(self, w: int, *cmd: Any) -> Any:
        self._conns[w].send(cmd)
        return self._conns[w].recv()

    def _inject(self, what: str, node: int) -> None:
        if node == 0:
            getattr(self.node0, what)()
        else:
            self._ask(self._home[node], what, node)

    def fail(self, node: int) -> None:
        self._inject("fail", node)

    def signal(self, node: int) -> None:
        self._inject("signal", node)

    def ops(self) -> int:
        return self.node0.coord.store.ops + sum(self._ask(w, "ops") for w in range(len(self._conns)))

    def refresh_marks(self) -> Marks:
        """Every node's marks so far (CLOCK_MONOTONIC is one clock for all processes of this machine)."""
        merged = Marks(dict(self.marks.stopped), dict(self.marks.past_barrier), dict(self.marks.decided),
                       dict(self.marks.exits))
        for w in range(len(self._conns)):
            theirs = self._ask(w, "marks")
            for name in ("stopped", "past_barrier", "decided", "exits"):
                getattr(merged, name).update(getattr(theirs, name))
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
            if everything.exits or time.monotonic() > deadline:  # a node that ended early holds the others up
                raise TimeoutError(f"{len(missing)} of {len(keys)} {which} marks missing, e.g. {missing[:3]}; "
                                   f"nodes ended: {dict(list(everything.exits.items())[:3])}")
            time.sleep(0.1)

    def close(self) -> dict[int, str]:
        """Wait for every node to end; how each ended."""
        exits = {}
        for w in range(len(self._conns)):
            exits.update(self._ask(w, "join").exits)
        self.node0.join(timeout=10)
        exits.update(self.marks.exits)
        self.shutdown()
        return exits

    def shutdown(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        self.node0.coord.close()


def thread_cpu_s(tids: list[int]) -> float:
    """User + system CPU seconds of this process's threads `tids` (from /proc)."""
    total = 0
    for tid in tids:
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def scenario(nnodes: int, run_dir: Path, steady_s: float, *, ranks: int = 8,
             status_probe: Callable[[Path], tuple[float, float]] | None = None) -> dict[str, Any]:
    """Start N nodes, measure steady state, then a rank failure on the last node (-> restart), then a
    preemption signal on node N/2 (-> every node stops); the figures bench/scale tabulates, plus node 0's
    decisions as [outcome or "restart", reason]. Raises unless every node ended preempted."""
    cluster = Cluster(nnodes, run_dir, ranks=ranks)
    every = list(range(nnodes))
    try:
        cluster.wait("past_barrier", [(0, n) for n in every], 300)
        coord0 = cluster.node0.coord
        time.sleep(2 * coord0.intervals.status_s)  # every node has published; node 0 merged once
        node0 = [cluster.node0.native_id, *cluster.server_threads]
        ops0, cpu0, t0 = cluster.ops(), thread_cpu_s(node0), time.monotonic()
        time.sleep(steady_s)
        ops1, cpu1, t1 = cluster.ops(), thread_cpu_s(node0), time.monotonic()
        status_wall, status_cpu = status_probe(run_dir) if status_probe else (float("nan"), float("nan"))
        status_kb = (run_dir / "status.json").stat().st_size / 1024

        failed_at = time.monotonic()
        cluster.fail(nnodes - 1)
        fail_to_stop = cluster.wait("stopped", [(0, n) for n in every], 60) - failed_at
        decide_to_go = cluster.wait("past_barrier", [(1, n) for n in every], 60) - cluster.marks.decided[0]
        time.sleep(1.0)
        signaled_at = time.monotonic()
        cluster.signal(nnodes // 2)
        preempt_to_stop = cluster.wait("stopped", [(1, n) for n in every], 60) - signaled_at
        ends = set(cluster.close().values())
        if ends != {Outcome.PREEMPTED}:
            raise RuntimeError(f"{nnodes} nodes ended {sorted(map(str, ends))}")
    finally:
        cluster.shutdown()
    return {"nodes": nnodes, "ranks": nnodes * ranks, "ops_per_s": (ops1 - ops0) / (t1 - t0),
            "fail_to_stop_s": fail_to_stop, "decide_to_go_s": decide_to_go, "preempt_to_stop_s": preempt_to_stop,
            "status_kb": status_kb, "status_cmd_s": status_wall, "status_cmd_cpu_s": status_cpu,
            "node0_cpu": (cpu1 - cpu0) / (t1 - t0), "poll_s": coord0.intervals.poll_s,
            "status_s": coord0.intervals.status_s,
            "decisions": [[str(d.outcome or "restart"), d.reason] for d in cluster.node0.decisions]}
