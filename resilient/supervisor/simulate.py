"""Scale simulation: many supervisors' coordination on threads of one process, against one real store.

Each simulated node runs the supervisor's attempt cycle (barrier, watch, report, node 0's decision,
status merge) through the same Coordinator, decisions and status functions as daemon.py; only the
rank processes are replaced by fake ranks that step on the clock. Node 0 hosts the real TCPStore
(bound, sealed) exactly as in a job. bench/scale drives it for 2..1024 nodes, the tests at 64.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from resilient.status import write_status
from resilient.supervisor import decisions
from resilient.supervisor.auth import Sealer
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.coordination import Coordinator, status_document, summarize_reports
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
    exits: dict[int, str] = field(default_factory=dict)
    """node -> how its supervisor ended (the outcome, or the exception)."""


class SimNode(threading.Thread):
    """One supervisor's coordination with `ranks` fake ranks; `fail()` and `signal()` inject events."""

    def __init__(self, coord: Coordinator, cfg: SupervisorConfig, ranks: int, step_s: float, marks: Marks,
                 run_dir: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name=f"sim-node-{coord.node}", daemon=True)
        self.coord, self.cfg, self.nranks, self.step_s, self.marks = coord, cfg, ranks, step_s, marks
        self.node, self.nnodes, self.run_dir, self.clock = coord.node, coord.nnodes, run_dir, clock
        self.attempt = 0
        self.state = "starting"
        self.restarts = 0
        self.no_progress_streak = 0
        self.reached_step = 0
        self.cpu_s = 0.0
        """This thread's CPU time so far (node 0's share of the work, for the bench)."""
        self._start_step = 0
        self._next_status = 0.0
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

    def _run(self) -> str:
        coord = self.coord
        if self.node == 0:
            coord.publish_first_attempt(0)
        self.attempt = self._wait(coord.first_attempt)
        while True:
            end = self._one_attempt()
            coord.report(self.attempt, {"outcome": end, "start_step": self._start_step,
                                        "reached_step": self.reached_step, "unhealthy": None})
            self._set_state("deciding")
            if self.node == 0:
                coord.publish_decision(self.attempt, self._decide(self._wait(lambda: coord.all_reports(self.attempt))))
                self.marks.decided[self.attempt] = self.clock()
            decision = self._wait(lambda: coord.decision(self.attempt))
            if not decision["restart"]:
                coord.ack(self.attempt)
                self._set_state(decision["outcome"])
                if self.node == 0:
                    self._wait(lambda: coord.all_acked(self.attempt))
                return decision["outcome"]
            self.restarts += 1
            self._sleep(decision["backoff_s"])
            self.attempt += 1

    def _one_attempt(self) -> str:
        coord = self.coord
        self._start_step = self.reached_step
        if self.node == 0:
            coord.publish_master_port(self.attempt, 29500 + self.attempt)
        self._set_state("waiting")
        coord.arrive(self.attempt)
        gate = self._wait(lambda: coord.barrier(self.attempt))
        self.marks.past_barrier[(self.attempt, self.node)] = self.clock()
        if gate != "go":
            return self._stop_ranks("preempted" if gate == "stop" else "failed")
        coord.master_port(self.attempt)
        self._spawned = self.clock()
        self._set_state("running")
        next_poll = self.clock() + coord.intervals.poll_s * (self.node % 64) / 64  # nodes start out of phase
        while True:
            now = self.clock()
            self.reached_step = self._start_step + int((now - self._spawned) / self.step_s)
            if self._fail.is_set():
                self._fail.clear()
                coord.request_restart(self.attempt, kind="rank_exit", rank=self.node * self.nranks,
                                      step=self.reached_step, reason="simulated rank failure")
                return self._stop_ranks("failed")
            if self._signal.is_set():
                self._signal.clear()
                coord.request_stop("preempted", f"node {self.node}: simulated preemption signal")
                return self._stop_ranks("preempted")
            if now >= next_poll:
                next_poll = now + coord.intervals.poll_s
                seen = coord.poll(self.attempt)
                if seen == "stop":
                    coord.request_stop("preempted", "stop requested by another supervisor")  # as daemon._begin_preempt
                    return self._stop_ranks("preempted")
                if seen == "restart":
                    return self._stop_ranks("failed")
            self._maybe_publish_status()
            self._wake.wait(max(0.0, min(next_poll, self._next_status) - self.clock()))
            self._wake.clear()

    def _stop_ranks(self, outcome: str) -> str:
        self.marks.stopped[(self.attempt, self.node)] = self.clock()  # fake ranks stop at once
        self._set_state("stopping")
        return outcome

    def _decide(self, reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
        summary = summarize_reports(reports, self.nnodes)
        progressed, _ = decisions.made_progress(summary.start_step, summary.reached_step)
        self.no_progress_streak = 0 if progressed else self.no_progress_streak + 1
        stop = self.coord.stop_requested()
        d = decisions.decide(decisions.JobState(
            restarts_done=self.restarts, no_progress_streak=self.no_progress_streak,
            all_finished=summary.all_finished, preempted=stop is not None or summary.preempted,
            unhealthy=summary.unhealthy, missing_nodes=summary.missing_nodes), self.cfg)
        return {"restart": d.restart, "exit_code": int(d.exit_code), "reason": d.reason, "backoff_s": d.backoff_s,
                "outcome": d.outcome.value if d.outcome else None}

    # -- status ---------------------------------------------------------------------------------------

    def _set_state(self, state: str) -> None:
        self.state = state
        self._next_status = 0.0
        self._maybe_publish_status()

    def _maybe_publish_status(self) -> None:
        now = self.clock()
        if now < self._next_status:
            return
        self._next_status = now + self.coord.intervals.status_s
        wall = time.time()
        running = self.state == "running"
        ranks = [{"rank": self.node * self.nranks + local, "local_rank": local, "node": self.node,
                  "node_name": f"sim{self.node:04d}", "pid": 100000 + self.node * self.nranks + local,
                  "phase": "step" if running else "init", "step": self.reached_step,
                  "last_heartbeat": wall, "heartbeat_age_s": 0.0, "exit_code": None}
                 for local in range(self.nranks)]
        self.coord.publish_status({"node": self.node, "node_name": f"sim{self.node:04d}", "state": self.state,
                                   "ranks": ranks, "metrics_port": None, "supervisor_pid": os.getpid()})
        if self.node == 0 and self.run_dir is not None:
            write_status(self.run_dir, status_document(
                self.coord.node_statuses(), state=self.state, attempt=self.attempt, step=self.reached_step,
                last_checkpoint=None, restarts=self.restarts, last_failure=None, stop=self.coord.stop_requested()))
        self.cpu_s = time.thread_time()

    # -- waiting ---------------------------------------------------------------------------------------

    def _wait(self, probe: Callable[[], T | None]) -> T:
        deadline = self.clock() + self.cfg.store_timeout_s
        while (got := probe()) is None:
            if self.clock() > deadline:
                raise TimeoutError(f"node {self.node}: waited {self.cfg.store_timeout_s:g}s in state {self.state}")
            self._maybe_publish_status()
            self._wake.wait(self.coord.intervals.poll_s)
            self._wake.clear()
        self.cpu_s = time.thread_time()
        return got

    def _sleep(self, seconds: float) -> None:
        deadline = self.clock() + seconds
        while (left := deadline - self.clock()) > 0:
            self._maybe_publish_status()
            time.sleep(min(left, self.coord.intervals.poll_s))


@dataclass
class Cluster:
    """N simulated nodes: node 0 hosts the store on 127.0.0.1, every node has its own client."""

    nodes: list[SimNode]
    marks: Marks
    run_dir: Path
    server_threads: list[int]
    """Thread ids of the store server (node 0's process), for its CPU time."""

    def ops(self) -> int:
        return sum(n.coord.store.ops for n in self.nodes)

    def close(self) -> None:
        for n in self.nodes:
            n.join(timeout=5)
        self.nodes[0].coord.close()


def start_cluster(nnodes: int, run_dir: Path, *, ranks: int = 8, step_s: float = 1.0,
                  cfg: SupervisorConfig | None = None, secret: bytes | None = None) -> Cluster:
    cfg = cfg or SupervisorConfig(backoff_initial_s=0.0, backoff_max_s=0.0, store_timeout_s=120.0)
    sealer = Sealer(secret or os.urandom(32), "sim")
    marks = Marks()

    def forged(key: str, reason: str) -> None:
        raise AssertionError(f"simulation saw a forged value: {reason}")

    threading.stack_size(512 * 1024)  # a thousand threads with the default 8 MiB stacks is a lot of address space
    before = set(os.listdir("/proc/self/task"))
    coords = [Coordinator.open(Topology(0, nnodes, "127.0.0.1", 0, "sim0000", "sim"), cfg, sealer, forged)]
    server = sorted(int(t) for t in set(os.listdir("/proc/self/task")) - before)
    for n in range(1, nnodes):
        coords.append(Coordinator.open(Topology(n, nnodes, "127.0.0.1", coords[0].port, f"sim{n:04d}", "sim"),
                                       cfg, sealer, forged))
    nodes = [SimNode(c, cfg, ranks, step_s, marks, run_dir if c.node == 0 else None) for c in coords]
    for n in nodes:
        n.start()
    return Cluster(nodes, marks, run_dir, server)


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


def wait_marks(marks: dict, keys: list, timeout_s: float) -> float:
    """The latest mark among `keys` once all are set (raises after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while any(k not in marks for k in keys):
        if time.monotonic() > deadline:
            missing = [k for k in keys if k not in marks]
            raise TimeoutError(f"{len(missing)} of {len(keys)} marks missing, e.g. {missing[:3]}")
        time.sleep(0.01)
    return max(marks[k] for k in keys)
