"""The per-node supervisor: spawn this node's ranks, watch them, restart all nodes together, stop cleanly.

One attempt, on every node:
  pre-flight -> barrier (store) -> spawn -> watch until: all ranks finished | a local failure
  (posted as the attempt's restart request) | another node's restart request | a stop request
  -> tear down -> report to the store -> node 0 decides (restart with backoff, or stop with an
  exit code) -> every node follows the decision.
All process work happens on the main thread: PR_SET_PDEATHSIG in the ranks follows the thread
that forked them.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from resilient.core import ledger
from resilient.core.atomic import atomic_write
from resilient.rank.heartbeat import HeartbeatServer
from resilient.config import RunConfig, dump_config
from resilient.core.errors import ResilientError
from resilient.core.exit_codes import ExitCode
from resilient.status import write_status
from resilient.supervisor import decisions
from resilient.supervisor.coordination import CoordinationLost, Coordinator
from resilient.supervisor.hooks import NodeHooks
from resilient.rank.env import DEFAULT_STOP_SIGNALS, RankEnv
from resilient.supervisor.ranks import RankProcess, free_port, spawn, stop_all
from resilient.supervisor.topology import Topology
from resilient.core.rundir import RunDir
from resilient.core.events import LedgerEvent

T = TypeVar("T")
# Coordinating a final decision: node 0 keeps the store up this long for the others to read it.
_ACK_WAIT_S = 10.0


@dataclass
class RankView:
    """What the supervisor knows about one local rank from its heartbeats."""

    rank: int
    local_rank: int
    pid: int
    phase: str = "init"
    step: int | None = None
    last_heartbeat: float | None = None
    """Wall-clock time of the last heartbeat (for status)."""
    last_progress: float = 0.0
    """Monotonic time of the last new (phase, step) (or spawn)."""
    progress_key: tuple[str, int | None] = ("init", None)


class Supervisor:
    def __init__(self, cfg: RunConfig, topo: Topology, run_dir: Path) -> None:
        self.cfg, self.scfg, self.topo, self.run_dir = cfg, cfg.supervisor, topo, run_dir
        self.node = topo.node_rank
        self.config_path = RunDir(run_dir).config
        self.attempt = 0
        self.restarts = 0
        self.no_progress_streak = 0
        self.state = "starting"
        self.ranks: list[RankProcess] = []
        self.views: dict[int, RankView] = {}
        self.step_times: collections.deque[float] = collections.deque(maxlen=self.scfg.step_timeout_window)
        self.ckpt_times: collections.deque[float] = collections.deque(maxlen=self.scfg.step_timeout_window)
        self.start_step: int | None = None
        self.reached_step: int | None = None
        self.last_failure: dict[str, Any] | None = None
        self.metrics_port: int | None = None
        self._signal: str | None = None
        self._stop_seen = False
        self._next_status = 0.0
        self.coord: Coordinator | None = None
        self.server: HeartbeatServer | None = None
        self.hooks = NodeHooks(cfg, topo.node_name, run_dir, is_node0=self.node == 0)

    # -- entry point --------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            return int(self._run())
        except CoordinationLost as err:
            self.coord = None  # status stays local from here on
            self._record_failure("supervisor", None, str(err))
            stop_all(self.ranks, self.scfg.termination_grace_s)
            outcome = decisions.Outcome.PREEMPTED if self._stop_seen else decisions.Outcome.COORDINATION_LOST
            self._set_state(outcome.value)
            return int(self._exit_code(outcome, str(err)))
        except ResilientError:
            raise
        except BaseException as err:
            self._record_failure("supervisor", None, f"{type(err).__name__}: {err}")
            raise
        finally:
            stop_all(self.ranks, self.scfg.termination_grace_s)
            self.hooks.stop()
            if self.server is not None:
                self.server.close()

    def _run(self) -> ExitCode:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.node == 0:
            self._write_config()
        self.metrics_port = self.hooks.start()
        self.server = HeartbeatServer(RunDir(self.run_dir).heartbeat_socket(self.node))
        self.coord = Coordinator(self.topo, self.scfg.store_timeout_s)
        if self.node == 0:
            self.coord.publish_first_attempt(_next_attempt(self.run_dir))
        first = self._wait_for(self.coord.first_attempt, self.scfg.store_timeout_s)
        if first is None:
            raise CoordinationLost(f"node 0 did not publish the first attempt within {self.scfg.store_timeout_s:g}s")
        self.attempt = first
        ledger.append(self.run_dir, LedgerEvent.RUN_START, attempt=first, node=self.node,
                      slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                      slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        while True:
            self._one_attempt()
            decision = self._decide()
            if not decision["restart"]:
                return self._finish(decision)
            self.restarts += 1
            self.hooks.on_restart()
            self._set_state("backoff")
            self._sleep_interruptibly(decision["backoff_s"])
            self.attempt += 1

    # -- one attempt -------------------------------------------------------------------------------

    def _one_attempt(self) -> None:
        """Run attempt `self.attempt` on this node until it ends here; its account goes to the store."""
        assert self.coord is not None
        self.start_step = self.reached_step = None
        self._set_state("preflight")
        unhealthy = self.hooks.preflight()
        if unhealthy:
            self._post_failure("health", None, unhealthy, latency=0.0)
            return self._report("unhealthy", unhealthy=unhealthy)
        if self.node == 0:
            self.coord.publish_master_port(self.attempt, free_port())
        self._set_state("waiting")
        self.coord.arrive(self.attempt)
        gate = self._wait_for(self._barrier, self.scfg.store_timeout_s)
        if gate is None:
            self._post_failure("supervisor", None, f"not all {self.topo.nnodes} supervisors joined attempt "
                                                   f"{self.attempt} within {self.scfg.store_timeout_s:g}s", latency=0.0)
            return self._report("failed")
        if gate != "go":
            return self._report("preempted" if gate == "stop" else "failed")
        self._spawn_ranks()
        self.hooks.start_monitor()
        self._set_state("running")
        try:
            end = self._watch()
        finally:
            self.hooks.stop_monitor()
        if end in ("failure", "restart"):
            self._set_state("stopping")
        stop_all(self.ranks, self.scfg.termination_grace_s)  # after a clean end: only leftovers in the groups
        return self._report({"failure": "failed", "restart": "failed"}.get(end, end))

    def _barrier(self) -> str | None:
        assert self.coord is not None
        if self.coord.stop_requested() is not None:
            self._stop_seen = True
            return "stop"
        if self.coord.restart_requested(self.attempt) is not None:
            return "restart"
        if self.coord.arrived(self.attempt) >= self.topo.nnodes:
            return "go"
        return None

    def _spawn_ranks(self) -> None:
        assert self.coord is not None
        port = self.coord.master_port(self.attempt)
        nproc = self.scfg.nproc_per_node
        self.ranks, self.views = [], {}
        for local in range(nproc):
            spec = RankEnv(
                rank=self.node * nproc + local, local_rank=local, world_size=self.topo.nnodes * nproc,
                local_world_size=nproc, node_rank=self.node, node_name=self.topo.node_name,
                master_addr=self.topo.master_addr, master_port=port, attempt=self.attempt,
                run_dir=self.run_dir, heartbeat_socket=self.server.path, supervisor_pid=os.getpid(),
                stop_signals=tuple(dict.fromkeys((*DEFAULT_STOP_SIGNALS, self.scfg.preempt_signal))),
            )
            proc = spawn(spec, self.scfg.rank_command, self.config_path)
            self.ranks.append(proc)
            self.views[spec.rank] = RankView(spec.rank, local, proc.pid, last_progress=proc.spawned_at)
        ledger.append(self.run_dir, LedgerEvent.ATTEMPT_START, attempt=self.attempt, node=self.node)

    def _watch(self) -> str:
        """Until this attempt ends on this node: 'finished', 'failure', 'restart' or 'preempted'."""
        assert self.coord is not None and self.server is not None
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        for r in self.ranks:
            sel.register(r.pidfd, selectors.EVENT_READ, r)
        preempt_deadline: float | None = None
        next_store_poll = 0.0
        try:
            while True:
                events = sel.select(self.scfg.poll_interval_s)
                now = time.monotonic()
                for key, _ in events:
                    if isinstance(key.data, RankProcess):
                        sel.unregister(key.fileobj)
                self._drain_wakeups()
                failure = self._handle_heartbeats(now)
                exits = [r for r in self.ranks if r.returncode is None and r.poll(now) is not None]
                if preempt_deadline is None:
                    if self._signal is not None:
                        preempt_deadline = self._begin_preempt(f"supervisor received {self._signal}", now)
                    elif any(r.returncode == ExitCode.PREEMPTED for r in exits):
                        preempt_deadline = self._begin_preempt("a rank exited PREEMPTED", now)
                if preempt_deadline is not None:
                    if all(r.returncode is not None for r in self.ranks):
                        return "preempted"
                    if now > preempt_deadline:
                        print(f"resilient: node {self.node}: ranks did not stop within "
                              f"{self.scfg.preempt_grace_s:g}s of the stop request; killing them", file=sys.stderr)
                        stop_all(self.ranks, 0.0)
                        return "preempted"
                    continue
                failure = failure or self._exit_failure(exits) or self._hang_failure(now)
                if failure is None and (reason := self.hooks.fatal_health()):
                    failure = ("health", None, reason, 0.0)
                if failure is not None:
                    kind, rank, reason, latency = failure
                    return self._post_failure(kind, rank, reason, latency)
                if all(r.returncode == 0 for r in self.ranks):
                    return "finished"
                if now >= next_store_poll:
                    next_store_poll = now + self.scfg.poll_interval_s
                    if self.coord.stop_requested() is not None:
                        preempt_deadline = self._begin_preempt("stop requested by another supervisor", now)
                    elif self.coord.restart_requested(self.attempt) is not None:
                        return "restart"
                self._maybe_publish_status()
        finally:
            sel.close()

    def _begin_preempt(self, reason: str, now: float) -> float:
        assert self.coord is not None
        self._stop_seen = True
        self.coord.request_stop("preempted", f"node {self.node}: {reason}")
        self._set_state("preempting")
        for r in self.ranks:
            r.signal_rank(signal.SIGUSR1)
        return now + self.scfg.preempt_grace_s

    # -- detection ---------------------------------------------------------------------------------

    def _handle_heartbeats(self, now: float) -> tuple[str, int | None, str, float] | None:
        assert self.server is not None
        failure = None
        for hb in self.server.drain():
            view = self.views.get(hb["rank"])
            if view is None or hb.get("attempt") != self.attempt:
                continue  # a late heartbeat of an earlier attempt
            phase, step = str(hb.get("phase")), hb["step"]
            if (phase, step) != view.progress_key:
                if phase == "step" and view.progress_key[0] == "step" and not _positive(hb.get("step_time")):
                    self.step_times.append(now - view.last_progress)
                view.progress_key, view.last_progress = (phase, step), now
            if phase == "step" and _positive(hb.get("step_time")):
                self.step_times.append(float(hb["step_time"]))
            if _positive(hb.get("ckpt_blocking_s")):
                self.ckpt_times.append(float(hb["ckpt_blocking_s"]))
            view.phase, view.step, view.last_heartbeat = phase, step, time.time()
            if phase in ("init", "restore"):
                self.start_step = max(self.start_step or 0, step)
            elif phase in ("step", "done"):
                self.reached_step = max(self.reached_step or 0, step)
            elif phase == "error" and failure is None:
                failure = ("rank_error", view.rank, f"rank {view.rank} reported an error: {hb.get('message', '')}", 0.0)
            self.hooks.on_heartbeat(hb)
        return failure

    def _exit_failure(self, exits: list[RankProcess]) -> tuple[str, int | None, str, float] | None:
        for r in exits:
            if r.returncode == 0:
                continue
            code = r.returncode
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return "rank_exit", r.spec.rank, f"rank {r.spec.rank} (pid {r.pid}) {how}", time.monotonic() - r.exited_at
        return None

    def _hang_failure(self, now: float) -> tuple[str, int | None, str, float] | None:
        step_timeout, _ = decisions.calibrated_step_timeout(list(self.step_times), self.scfg)
        ckpt_timeout, _ = decisions.calibrated_checkpoint_timeout(list(self.ckpt_times), self.scfg)
        stale: dict[int, tuple[object, str]] = {}
        for r in self.ranks:
            if r.returncode is not None:
                continue
            view = self.views[r.spec.rank]
            hung, reason = decisions.is_hung(view.phase, view.last_progress, now, step_timeout, self.scfg,
                                             ckpt_timeout)
            if hung:
                stale[view.rank] = (r, reason)
        if not stale:
            return None
        rank, blame = decisions.blame_hang([(rank, self.views[rank].step, self.views[rank].last_progress,
                                             _process_state(r.pid)) for rank, (r, _) in stale.items()])
        r, reason = stale[rank]
        view = self.views[rank]
        return "hang", rank, f"rank {rank} (pid {r.pid}): {reason}; {blame}", now - view.last_progress

    def _post_failure(self, kind: str, rank: int | None, reason: str, latency: float) -> str:
        """Ask every node to restart; only the first request of an attempt is recorded as its failure."""
        assert self.coord is not None
        step = self._current_step()
        if self.coord.request_restart(self.attempt, kind=kind, rank=rank, step=step, reason=reason):
            self._record_failure(kind, rank, reason, latency)
            return "failure"
        return "restart"

    def _record_failure(self, kind: str, rank: int | None, reason: str, latency: float = 0.0) -> None:
        self.last_failure = {"kind": kind, "rank": rank, "node": self.node, "step": self._current_step(),
                             "latency_seconds": round(latency, 3), "reason": reason}
        ledger.append(self.run_dir, LedgerEvent.FAILURE, **self.last_failure)
        self.hooks.on_failure(kind)
        print(f"resilient: node {self.node} attempt {self.attempt}: {kind}: {reason}", file=sys.stderr)

    # -- end of an attempt -------------------------------------------------------------------------

    def _report(self, outcome: str, unhealthy: str | None = None) -> None:
        assert self.coord is not None
        self.coord.report(self.attempt, {"outcome": outcome, "start_step": self.start_step,
                                         "reached_step": self.reached_step, "unhealthy": unhealthy})

    def _decide(self) -> dict[str, Any]:
        """Node 0 turns every node's report into the decision; the others wait for it."""
        assert self.coord is not None
        self._set_state("deciding")
        if self.node == 0:
            reports = self._wait_for(lambda: self._all_reports(), self.scfg.store_timeout_s)
            reports = reports or self.coord.reports(self.attempt, self.topo.nnodes)
            self.coord.publish_decision(self.attempt, self._node0_decision(reports))
        decision = self._wait_for(lambda: self.coord.decision(self.attempt), self.scfg.store_timeout_s)
        if decision is None:
            raise CoordinationLost(f"no decision for attempt {self.attempt} within {self.scfg.store_timeout_s:g}s")
        failure = self.coord.restart_requested(self.attempt)
        if failure is not None:
            self.last_failure = failure
        return decision

    def _all_reports(self) -> dict[int, dict[str, Any]] | None:
        reports = self.coord.reports(self.attempt, self.topo.nnodes)
        return reports if len(reports) == self.topo.nnodes else None

    def _node0_decision(self, reports: dict[int, dict[str, Any]]) -> dict[str, Any]:
        starts = [r["start_step"] for r in reports.values() if r["start_step"] is not None]
        reached = [r["reached_step"] for r in reports.values() if r["reached_step"] is not None]
        progressed, _ = decisions.made_progress(min(starts, default=None), max(reached, default=None))
        self.no_progress_streak = 0 if progressed else self.no_progress_streak + 1
        stop = self.coord.stop_requested()
        state = decisions.JobState(
            restarts_done=self.restarts,
            no_progress_streak=self.no_progress_streak,
            all_finished=all(r["outcome"] == "finished" for r in reports.values()) and len(reports) == self.topo.nnodes,
            preempted=stop is not None or any(r["outcome"] == "preempted" for r in reports.values()),
            unhealthy=next((r["unhealthy"] for r in reports.values() if r["unhealthy"]), None),
            missing_nodes=tuple(n for n in range(self.topo.nnodes) if n not in reports),
        )
        d = decisions.decide(state, self.scfg)
        step = max(reached, default=None)
        failure = self.coord.restart_requested(self.attempt)
        if d.restart:
            ledger.append(self.run_dir, LedgerEvent.RESTART, attempt=self.attempt + 1, backoff_seconds=d.backoff_s,
                          reason=f"{failure['reason'] if failure else 'restart'}; {d.reason}")
        elif d.outcome is decisions.Outcome.FINISHED:
            ledger.append(self.run_dir, LedgerEvent.FINISHED, step=step)
        elif d.outcome is decisions.Outcome.PREEMPTED:
            ledger.append(self.run_dir, LedgerEvent.PREEMPTED, step=step, node=stop["node"] if stop else self.node)
        else:
            ledger.append(self.run_dir, LedgerEvent.GAVE_UP, reason=d.reason, exit_code=int(d.exit_code))
        return {"restart": d.restart, "exit_code": int(d.exit_code), "reason": d.reason, "backoff_s": d.backoff_s,
                "outcome": d.outcome.value if d.outcome else None}

    def _finish(self, decision: dict[str, Any]) -> ExitCode:
        """Publish the final state, then let node 0 keep the store up until every node has read the decision."""
        assert self.coord is not None
        outcome = decisions.Outcome(decision["outcome"])
        self._set_state(outcome.value)
        self.coord.ack(self.attempt)
        if self.node == 0 and self.topo.nnodes > 1:
            self._wait_for(lambda: True if self.coord.acks(self.attempt) >= self.topo.nnodes else None, _ACK_WAIT_S)
            self._write_status()
        return self._exit_code(outcome, decision["reason"])

    def _exit_code(self, outcome: decisions.Outcome, reason: str) -> ExitCode:
        code, meaning = decisions.exit_code_for(outcome)
        print(f"resilient: node {self.node}: {outcome.value}: {reason} (exit {int(code)}: {meaning})", file=sys.stderr)
        return code

    # -- status --------------------------------------------------------------------------------------

    def _current_step(self) -> int | None:
        steps = [v.step for v in self.views.values() if v.step is not None]
        return max(steps, default=self.reached_step)

    def _set_state(self, state: str) -> None:
        self.state = state
        self.hooks.set_state(state, self.attempt)
        self._next_status = 0.0  # publish every state change at once
        self._maybe_publish_status()

    def _maybe_publish_status(self) -> None:
        now = time.monotonic()
        if now < self._next_status or self.coord is None:
            return
        self._next_status = now + self.scfg.status_interval_s
        self.hooks.check_stragglers()
        wall = time.time()
        ranks = []
        for r in self.ranks:
            v = self.views[r.spec.rank]
            age = None if v.last_heartbeat is None else wall - v.last_heartbeat
            if age is not None and r.returncode is None:
                self.hooks.heartbeat_age(v.rank, age)
            ranks.append({"rank": v.rank, "local_rank": v.local_rank, "node": self.node,
                          "node_name": self.topo.node_name, "pid": v.pid, "phase": v.phase, "step": v.step,
                          "last_heartbeat": v.last_heartbeat, "heartbeat_age_s": age, "exit_code": r.returncode})
        self.coord.publish_status({"node": self.node, "node_name": self.topo.node_name, "state": self.state,
                                   "ranks": ranks, "metrics_port": self.metrics_port, "supervisor_pid": os.getpid()})
        if self.node == 0:
            self._write_status()

    def _write_status(self) -> None:
        nodes = self.coord.node_statuses(self.topo.nnodes)
        ranks = sorted((r for s in nodes.values() for r in s["ranks"]), key=lambda r: r["rank"])
        steps = [r["step"] for r in ranks if r["step"] is not None]
        saves = [e["step"] for e in ledger.read(self.run_dir) if e.get("event") == "ckpt_save"]
        write_status(self.run_dir, {
            "state": self.state, "attempt": self.attempt, "step": max(steps, default=self.reached_step),
            "last_checkpoint": saves[-1] if saves else None, "restarts": self.restarts,
            "last_failure": self.last_failure, "nodes": {str(n): s["state"] for n, s in nodes.items()},
            "metrics_ports": {s["node_name"]: s["metrics_port"] for s in nodes.values()}, "ranks": ranks,
        })

    # -- waiting, signals, files -------------------------------------------------------------------

    def _install_signals(self) -> None:
        self._wake_r, wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        wake_w.setblocking(False)
        self._wake_w = wake_w  # kept alive: the wakeup fd must stay open
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        for sig in {signal.SIGTERM, signal.SIGINT, signal.Signals[self.scfg.preempt_signal]}:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signal.Signals(signum).name

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _sleep_interruptibly(self, seconds: float) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            deadline = time.monotonic() + seconds
            while (left := deadline - time.monotonic()) > 0 and self._signal is None:
                sel.select(min(left, self.scfg.poll_interval_s))
                self._drain_wakeups()
                self._maybe_publish_status()

    def _wait_for(self, probe: Callable[[], T | None], timeout_s: float) -> T | None:
        """Poll `probe` until it returns something or time runs out; a signal meanwhile becomes a stop request."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._signal is not None and not self._stop_seen and self.coord is not None:
                self._stop_seen = True
                self.coord.request_stop("preempted", f"node {self.node}: supervisor received {self._signal}")
            got = probe()
            if got is not None or time.monotonic() > deadline:
                return got
            self._maybe_publish_status()
            with selectors.DefaultSelector() as sel:
                sel.register(self._wake_r, selectors.EVENT_READ)
                sel.select(min(self.scfg.poll_interval_s, max(0.0, deadline - time.monotonic())))
            self._drain_wakeups()

    def _write_config(self) -> None:
        atomic_write(self.config_path, dump_config(self.cfg))


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _next_attempt(run_dir: Path) -> int:
    """Attempt numbers continue across requeued allocations, so log names never collide."""
    seen = [e["attempt"] for e in ledger.read(run_dir) if e.get("event") == "attempt_start"]
    return max(seen) + 1 if seen else 0


def _process_state(pid: int) -> str:
    """psutil's process status ('stopped' for SIGSTOP), or 'gone'."""
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return "gone"
