"""The per-node supervisor: spawn this node's ranks, watch them, restart all nodes together, stop cleanly.

One attempt, on every node:
  pre-flight -> barrier (store) -> spawn -> watch until: all ranks finished | a local failure
  (posted as the attempt's restart request) | another node's restart request | a stop request
  -> tear down -> report to the store -> node 0 decides (restart with backoff, or stop with an
  exit code) -> every node follows the decision.
Heartbeats are tracked in `tracking`, failures detected in `failures`, status published by
`publishing`; this module sequences them. All process work happens on the main thread:
PR_SET_PDEATHSIG in the ranks follows the thread that forked them.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from health.actions import Verdict
from resilient.config import RunConfig, dump_config
from resilient.core import guarded, ledger, permissions
from resilient.core.atomic import atomic_write
from resilient.core.errors import ConfigError, ResilientError, StorageFault
from resilient.core.events import LedgerEvent
from resilient.core.exit_codes import ExitCode
from resilient.core.outcome import Outcome, exit_code_for
from resilient.core.rundir import RunDir
from resilient.metrics.exporter import NodeMetrics
from resilient.rank.env import DEFAULT_STOP_SIGNALS, FailureHistory, RankEnv
from resilient.rank.heartbeat import HeartbeatServer
from resilient.report.rank_steps import RankStepLog
from resilient.supervisor import calibration, decisions, failures, incidents, progress, publishing, spares, timeouts
from resilient.supervisor.auth import Sealer, load_or_create_secret
from resilient.supervisor.calibration import CalibrationStore
from resilient.supervisor.config import RankProtocol
from resilient.supervisor.console import progress_line
from resilient.supervisor.coordination import CoordinationLost, Coordinator, Gate
from resilient.supervisor.decisions import AttemptContext, AttemptDecision
from resilient.supervisor.failures import Failure, FailureKind
from resilient.supervisor.goodput_refresh import GoodputRefresh
from resilient.supervisor.health_watch import HealthWatch
from resilient.supervisor.ranks import RankProcess, free_port, spawn, stop_all
from resilient.supervisor.reports import NodeOutcome, NodeReport, RankExit, StopKind, StopRequest
from resilient.supervisor.states import State
from resilient.supervisor.straggler_ledger import StragglerLedger
from resilient.supervisor.topology import Topology
from resilient.supervisor.tracking import HeartbeatTracker, RankView
from trainer.checkpoint.manifest import recorded_mismatch

T = TypeVar("T")
# Coordinating a final decision: node 0 keeps the store up this long for the others to read it.
_ACK_WAIT_S = 10.0


class Supervisor:
    def __init__(self, cfg: RunConfig, topo: Topology, run_dir: Path) -> None:
        self.cfg, self.scfg, self.topo, self.run_dir = cfg, cfg.supervisor, topo, run_dir
        self.node = topo.node_rank
        self.config_path = RunDir(run_dir).config
        self.attempt = 0
        self.restarts = 0
        self.no_progress_streak = 0
        self.state: State | Outcome = State.STARTING
        self.ranks: list[RankProcess] = []
        self.tracker = HeartbeatTracker(self.scfg.step_timeout_window)
        self.calibration = CalibrationStore(run_dir, self.node, self.tracker, calibration.signature(
            cfg.model.model_dump(), cfg.parallel.model_dump(), cfg.train.global_batch, cfg.train.micro_batch,
            cfg.seq_len, topo.nnodes, self.scfg.nproc_per_node, self.scfg.rank_command))  # seeds the tracker
        self.last_failure: dict[str, Any] | None = None
        self.metrics_port: int | None = None
        self._signal: str | None = None
        self._stop_seen = False
        self._status_due = publishing.Throttle(self.scfg.status_interval_s)  # the store's pace once it is open
        self._merge_due = publishing.Throttle(self.scfg.status_interval_s)
        self._forged_keys: set[str] = set()
        self._final_exit: RankExit | None = None  # a rank's CONFIG_ERROR / CHECKPOINT_DAMAGED this attempt
        self._unhealthy: str | None = None  # this attempt's fatal verdict on this node, naming it
        self.coord: Coordinator | None = None
        self.server: HeartbeatServer | None = None
        self.metrics = NodeMetrics(cfg.metrics, topo.node_name)
        self.metrics.declare_failure_kinds(FailureKind)
        self.health = HealthWatch(cfg.health, topo.node_name, run_dir, cfg.checkpoint.root(run_dir),
                                  self.scfg.nproc_per_node, self.metrics)
        self.stragglers = StragglerLedger(cfg.health, run_dir, topo.node_name, self.metrics)
        self.goodput: GoodputRefresh | None = None  # node 0, while metrics are served
        self.rank_steps = RankStepLog(run_dir, self.node)  # per-rank step times for `resilient report`
        # exit_only: progress is the newest complete checkpoint, hangs are caught only for ranks that send heartbeats.
        self.exit_only = self.scfg.rank_protocol is RankProtocol.EXIT_ONLY
        self.progress_root = progress.progress_dir(self.scfg.progress_dir, cfg.checkpoint.dir, run_dir)
        self.spares: spares.Spares | None = None
        self._refill_at: float | None = None  # when the current attempt's ranks were spawned, until refilled
        self.dirs: dict[Path, permissions.DirId] = {}
        """The run and checkpoint directories as this supervisor found them: one that vanishes or is replaced
        while the run uses it is a storage fault (never written to, never loaded from)."""
        self._dirs_checked = 0.0

    # -- entry point --------------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        try:
            return int(self._run())
        except CoordinationLost as err:
            self.coord = None  # status stays local from here on
            self._record_failure(self._failure(FailureKind.SUPERVISOR, None, str(err)))
            ledger.append(self.run_dir, LedgerEvent.COORDINATOR_LOST, node=self.node, attempt=self.attempt,
                          reason=str(err))
            stop_all(self.ranks, self.scfg.termination_grace_s)
            outcome = Outcome.PREEMPTED if self._stop_seen else Outcome.COORDINATION_LOST
            self._set_state(outcome)
            return int(self._exit_code(outcome, str(err)))
        except ResilientError as err:
            self.metrics.on_exit(err.exit_code, err.one_line())
            raise
        except BaseException as err:
            self._record_failure(self._failure(FailureKind.SUPERVISOR, None, f"{type(err).__name__}: {err}"))
            self.metrics.on_exit(ExitCode.INTERNAL_ERROR, f"{type(err).__name__}: {err}")
            raise
        finally:
            stop_all(self.ranks, self.scfg.termination_grace_s)
            self.calibration.close()
            if self.spares is not None:
                self.spares.close()
            self.health.stop_monitor()
            if self.goodput is not None:
                self.goodput.stop()
            self.metrics.stop()
            if self.server is not None:
                self.server.close()

    def _run(self) -> ExitCode:
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ckpt_root = self.cfg.checkpoint.root(self.run_dir)
        ckpt_root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dirs = permissions.capture([self.run_dir, ckpt_root])
        if self.node == 0:
            self._write_config()
        self.metrics_port = self.metrics.start()
        if self.node == 0 and self.metrics_port is not None:
            self.goodput = GoodputRefresh(self.run_dir, self.cfg.metrics.goodput_interval_s, self.metrics).start()
        self.server = HeartbeatServer(RunDir(self.run_dir).heartbeat_socket(self.node))
        self._start_spares()
        sealer = Sealer(load_or_create_secret(self.run_dir), self.topo.instance)
        self.coord = Coordinator.open(self.topo, self.scfg, sealer, self._on_forged)
        self._status_due.interval_s = self.coord.intervals.status_s
        self._merge_due.interval_s = self.coord.intervals.merge_s
        if self.node == 0:
            self.coord.publish_first_attempt(_next_attempt(self.run_dir))
        first = self._wait_for(self.coord.first_attempt, self.scfg.store_timeout_s)
        if first is None:
            raise CoordinationLost(f"node 0 did not publish the first attempt within {self.scfg.store_timeout_s:g}s")
        self.attempt = first
        self.calibration.begin(first)
        ledger.append(self.run_dir, LedgerEvent.RUN_START, attempt=first, node=self.node,
                      slurm_job_id=os.environ.get("SLURM_JOB_ID"),
                      slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))
        while True:
            self._one_attempt()
            decision = self._decide()
            if not decision.restart:
                return self._finish(decision)
            self.restarts += 1
            self.metrics.on_restart()
            self._set_state(State.BACKOFF)
            self._sleep_interruptibly(decision.backoff_s)
            self.attempt += 1

    # -- one attempt -------------------------------------------------------------------------------

    def _one_attempt(self) -> None:
        """Run attempt `self.attempt` on this node until it ends here; its account goes to the store."""
        assert self.coord is not None
        self.tracker.new_attempt()
        self._final_exit = self._unhealthy = None
        self._set_state(State.PREFLIGHT)
        if changed := self._changed_dir():  # every node stops; node 0 decides STORAGE_FAULT
            self._storage_fault(changed)
            return self._report(NodeOutcome.PREEMPTED)
        if not self.scfg.allow_shared_dir and (shared := self._shared_dir()):  # made shared since the start
            self._final_exit = RankExit(int(ExitCode.CONFIG_ERROR), shared)
            self._record_failure(self._failure(FailureKind.SUPERVISOR, None, shared))
            return self._report(NodeOutcome.FAILED)
        verdict = self.health.preflight()
        if verdict is not None and verdict.verdict is Verdict.STORAGE:  # every node stops; node 0 decides STORAGE_FAULT
            self._storage_fault(verdict.reason)
            return self._report(NodeOutcome.PREEMPTED)
        if verdict is not None:
            self._post_failure(self._failure(FailureKind.HEALTH, None, verdict.reason))
            self._unhealthy = verdict.reason
            return self._report(NodeOutcome.UNHEALTHY)
        if self.node == 0:
            self.coord.publish_master_port(self.attempt, free_port())
        self._set_state(State.WAITING)
        self.coord.arrive(self.attempt)
        gate = self._wait_for(self._barrier, self.scfg.store_timeout_s)
        if gate is None:
            self._post_failure(self._failure(FailureKind.SUPERVISOR, None,
                                             f"not all {self.topo.nnodes} supervisors joined attempt "
                                             f"{self.attempt} within {self.scfg.store_timeout_s:g}s"))
            return self._report(NodeOutcome.FAILED)
        if gate is not Gate.GO:
            return self._report(NodeOutcome.PREEMPTED if gate is Gate.STOP else NodeOutcome.FAILED)
        start = progress.newest_complete_step(self.progress_root) if self.exit_only else None
        try:
            self._spawn_ranks()
        except StorageFault as err:  # a rank's log cannot be opened safely: nothing is written through it
            stop_all(self.ranks, 0.0)
            self._storage_fault(str(err))
            return self._report(NodeOutcome.PREEMPTED)
        self.health.start_monitor()
        self._set_state(State.RUNNING)
        try:
            end = self._watch()
        finally:
            self.health.stop_monitor()
        if end is NodeOutcome.FAILED:
            self._set_state(State.STOPPING)
        # A failed attempt's survivors are SIGKILLed at once: every rank is replaced anyway, and a rank
        # blocked in a gloo collective cannot be aborted (on GPU, NCCL communicators die with the process).
        # After a clean end only leftovers in the groups remain; a preemption had its grace in _watch.
        stop_all(self.ranks, 0.0 if end is NodeOutcome.FAILED else self.scfg.termination_grace_s)
        if self.exit_only:
            reached = progress.newest_complete_step(self.progress_root)
            self.tracker.start_step, self.tracker.reached_step = start, reached
        return self._report(end)

    def _barrier(self) -> Gate | None:
        assert self.coord is not None
        gate = self.coord.barrier(self.attempt)
        self._stop_seen = self._stop_seen or gate is Gate.STOP
        return gate

    def _rank_specs(self, port: int, attempt: int, history: FailureHistory = FailureHistory()) -> list[RankEnv]:
        assert self.server is not None
        nproc = self.scfg.nproc_per_node
        return [RankEnv(
            rank=self.node * nproc + local, local_rank=local, world_size=self.topo.nnodes * nproc,
            local_world_size=nproc, node_rank=self.node, node_name=self.topo.node_name,
            master_addr=self.topo.master_addr, master_port=port, attempt=attempt,
            run_dir=self.run_dir, heartbeat_socket=self.server.path, supervisor_pid=os.getpid(),
            allow_shared_dir=self.scfg.allow_shared_dir,
            stop_signals=tuple(dict.fromkeys((self.scfg.stop_signal().name, *DEFAULT_STOP_SIGNALS,
                                              self.scfg.preempt_signal))),
            history=history,
        ) for local in range(nproc)]

    def _spawn_ranks(self) -> None:
        assert self.coord is not None
        argv = self.scfg.rank_argv(self.config_path, self.run_dir)
        self.ranks, views, warm = [], [], 0
        for spec in self._rank_specs(self.coord.master_port(self.attempt), self.attempt, self.calibration.history()):
            proc = self.spares.take(spec, argv) if self.spares is not None else None
            warm += proc is not None
            proc = proc or spawn(spec, argv)
            self.ranks.append(proc)
            views.append(RankView(spec.rank, spec.local_rank, proc.pid, last_progress=proc.spawned_at))
        self.tracker.track(views)
        self._refill_at = time.monotonic() if self.spares is not None else None
        ledger.append(self.run_dir, LedgerEvent.ATTEMPT_START, attempt=self.attempt, node=self.node,
                      warm_ranks=warm, pids=[r.pid for r in self.ranks])

    def _start_spares(self) -> None:
        """Park one process per local rank, if the rank command can be parked (else say why not)."""
        if not self.scfg.warm_spares:
            return
        cmd, reason = spares.park_argv(self.scfg.rank_argv(self.config_path, self.run_dir), sys.executable,
                                       self.scfg.warm_imports)
        print(f"resilient: node {self.node}: warm spares: {reason}", file=sys.stderr)
        if cmd is not None:
            self.spares = spares.Spares(cmd, self.run_dir, self.node)
            self._refill_spares()

    def _refill_spares(self) -> None:
        """Replace the spares the last attempt took; they carry their future rank's identity, with
        placeholders (attempt -1, port 0, no failure history) for what the assignment sets."""
        assert self.spares is not None
        self._refill_at = None
        if self.spares.fill(self._rank_specs(0, -1)):
            self._status_due.force()  # their count and memory go out with the next status

    def _maybe_refill_spares(self, now: float) -> None:
        if self._refill_at is None or self.spares is None:
            return
        views = [self.tracker.views[r.spec.rank] for r in self.ranks]
        phases = [v.phase if v.last_heartbeat is not None else None for v in views]
        due, _ = spares.refill_due(phases, now - self._refill_at, self.scfg.spare_refill_delay_s)
        if due:
            self._refill_spares()

    def _watch(self) -> NodeOutcome:
        """Until this attempt ends on this node: FINISHED, FAILED (here or on another node) or PREEMPTED."""
        assert self.coord is not None and self.server is not None
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        for r in self.ranks:
            sel.register(r.pidfd, selectors.EVENT_READ, r)
        preempt_deadline: float | None = None
        done_since: float | None = None
        next_store_poll = 0.0
        try:
            while True:
                events = sel.select(self.coord.intervals.poll_s)
                now = time.monotonic()
                for key, _ in events:
                    if isinstance(key.data, RankProcess):
                        sel.unregister(key.fileobj)
                self._drain_wakeups()
                for hb in self.server.drain():
                    if self.tracker.observe(hb, self.attempt, now):
                        self.metrics.on_heartbeat(hb["rank"], hb.get("local_rank", 0), hb)
                        self.stragglers.observe(hb)
                        self.rank_steps.observe(hb)
                        if line := progress_line(hb, self.cfg.train):
                            print(line, file=sys.stderr, flush=True)
                exits = [r for r in self.ranks if r.returncode is None and r.poll(now) is not None]
                if preempt_deadline is None:
                    if self._signal is not None:
                        preempt_deadline = self._begin_preempt(f"supervisor received {self._signal}", now)
                    elif stopped := next((r for r in exits if r.returncode == ExitCode.PREEMPTED), None):
                        said = self.tracker.views[stopped.spec.rank].done_message
                        preempt_deadline = self._begin_preempt(
                            f"rank {stopped.spec.rank} exited PREEMPTED" + (f": {said}" if said else ""), now)
                if preempt_deadline is not None:
                    if all(r.returncode is not None for r in self.ranks):
                        return NodeOutcome.PREEMPTED
                    if now > preempt_deadline:
                        print(f"resilient: node {self.node}: ranks did not stop within "
                              f"{self.scfg.preempt_grace_s:g}s of the stop request; killing them", file=sys.stderr)
                        stop_all(self.ranks, 0.0)
                        return NodeOutcome.PREEMPTED
                    continue
                failure = self._detect(exits, now)
                if failure is not None and failure.kind is FailureKind.STORAGE:  # save while there is room
                    preempt_deadline = self._begin_preempt(self._storage_fault(failure.reason), now, StopKind.STORAGE)
                    continue
                if failure is not None:
                    # Evidence before teardown (stacks of a hang, a crash's log tail): RUN_DIR/incidents/.
                    incident = incidents.capture(self.run_dir, self.attempt, str(failure.kind), failure.rank,
                                                 failure.reason, incidents.targets(self.ranks, self.tracker.views),
                                                 node=self.node)
                    self._post_failure(dataclasses.replace(failure, incident=incident))
                    return NodeOutcome.FAILED
                if all(r.returncode == 0 for r in self.ranks):
                    return NodeOutcome.FINISHED
                if timeouts.all_done([(self.tracker.views[r.spec.rank].phase, r.returncode) for r in self.ranks]):
                    done_since = done_since or now
                    if now - done_since > self.scfg.done_grace_s:
                        print(f"resilient: node {self.node}: every rank reported done; stopping the ones still "
                              f"running {self.scfg.done_grace_s:g}s later", file=sys.stderr)
                        stop_all(self.ranks, self.scfg.termination_grace_s)
                        return NodeOutcome.FINISHED
                else:
                    done_since = None
                if now >= next_store_poll:
                    next_store_poll = now + self.coord.intervals.poll_s
                    seen = self.coord.poll(self.attempt)  # one round trip unless something was posted
                    if seen is Gate.STOP:
                        preempt_deadline = self._begin_preempt(_stop_seen_reason(self.coord.stop_requested()), now)
                    elif seen is Gate.RESTART and (request := self.coord.restart_requested(self.attempt)) is not None:
                        # Another node's hang: add this node's stacks to its incident before teardown.
                        incidents.capture(self.run_dir, self.attempt, request.get("kind", ""), request.get("rank"),
                                          request.get("reason", ""), incidents.targets(self.ranks, self.tracker.views),
                                          node=self.node, peer=True)
                        return NodeOutcome.FAILED
                self._maybe_refill_spares(now)
                self._maybe_publish_status()
        finally:
            sel.close()

    def _detect(self, exits: list[RankProcess], now: float) -> Failure | None:
        """This node's first failure now: a reported error, a bad exit, a hang, a fatal health verdict."""
        failure = (failures.reported_error(self.tracker, self.node)
                   or failures.exit_failure(exits, self.node, self.tracker.current_step(), now)
                   or failures.hang_failure(self.ranks, self.tracker, self.scfg, self.node, now,
                                            heard_only=self.exit_only))
        if failure is None and (verdict := self.health.fatal()) is not None:
            kind = FailureKind.STORAGE if verdict.verdict is Verdict.STORAGE else FailureKind.HEALTH
            failure = self._failure(kind, None, verdict.reason)
        if failure is None and now - self._dirs_checked >= 1.0:
            self._dirs_checked = now
            if changed := self._changed_dir():
                failure = self._failure(FailureKind.STORAGE, None, changed)
        if failure is not None:
            rank_exit = failures.rank_exit(failure, exits, self.tracker)
            self._judge_rank_exit(rank_exit)
            if rank_exit is not None and rank_exit.code == ExitCode.STORAGE_FAULT:  # the rank found storage trouble
                failure = dataclasses.replace(failure, kind=FailureKind.STORAGE)
        return failure

    def _judge_rank_exit(self, rank_exit: RankExit | None) -> None:
        """A rank's exit code that is a verdict, not a crash: CONFIG_ERROR / CHECKPOINT_DAMAGED end the run;
        UNHEALTHY_NODE condemns this node, recorded like a fatal health check (`slurm on-exit` then
        requeues the job without it)."""
        if rank_exit is None:
            return
        if decisions.rank_exit_is_final(rank_exit.code) and self._final_exit is None:
            self._final_exit = rank_exit
        elif decisions.rank_exit_condemns_node(rank_exit.code) and self._unhealthy is None:
            self._unhealthy = (f"node {self.topo.node_name}: {rank_exit.reason} "
                               "(UNHEALTHY_NODE: the rank found this node unfit)")
            ledger.append(self.run_dir, LedgerEvent.HEALTH, node=self.topo.node_name, severity="fatal",
                          check="rank.exit", reason=self._unhealthy)

    def _begin_preempt(self, reason: str, now: float, kind: StopKind = StopKind.PREEMPTED) -> float:
        assert self.coord is not None
        self._stop_seen = True
        self.coord.request_stop(kind, f"node {self.node}: {reason}")
        self._set_state(State.PREEMPTING)
        for r in self.ranks:
            r.signal_rank(self.scfg.stop_signal())
        return now + self.scfg.preempt_grace_s

    # -- failures ----------------------------------------------------------------------------------

    def _failure(self, kind: FailureKind, rank: int | None, reason: str) -> Failure:
        return Failure(kind, rank, self.node, self.tracker.current_step(), reason)

    def _post_failure(self, failure: Failure) -> None:
        """Ask every node to restart; only the first request of an attempt is recorded as its failure."""
        assert self.coord is not None
        if self.coord.request_restart(self.attempt, kind=str(failure.kind), rank=failure.rank, step=failure.step,
                                      reason=failure.reason):
            self._record_failure(failure)

    def _record_failure(self, failure: Failure) -> None:
        self.last_failure = failure.record()
        ledger.append(self.run_dir, LedgerEvent.FAILURE, **self.last_failure)
        self.calibration.on_failure(self.last_failure, self.attempt)
        self.metrics.on_failure(failure.kind)
        print(f"resilient: node {self.node} attempt {self.attempt}: {failure.kind}: {failure.reason}", file=sys.stderr)

    # -- storage -----------------------------------------------------------------------------------

    def _storage_fault(self, reason: str) -> str:
        """Record storage trouble (ledger, metric, stderr) as its own fault class; returns the reason."""
        ledger.append(self.run_dir, LedgerEvent.STORAGE_FAULT, node=self.node, step=self.tracker.current_step(), reason=reason)
        self.metrics.on_storage_fault()
        print(f"resilient: node {self.node}: storage fault: {reason}", file=sys.stderr, flush=True)
        if self.coord is not None:
            self.coord.request_stop(StopKind.STORAGE, reason)  # every node saves and stops; first request wins
        return reason

    def _changed_dir(self) -> str | None:
        """Why a directory of the run vanished or was replaced, or None; a replaced run dir is written to no
        more (ledger, status): what takes its place is not the run's."""
        changed = permissions.changed_dirs(self.dirs)
        if changed is None:
            return None
        path, reason = changed
        if path == self.run_dir:
            guarded.fence(self.run_dir, reason)
        return reason

    def _shared_dir(self) -> str | None:
        """Why a directory of the run (or the path to it) is no longer this user's alone, or None."""
        for path in self.dirs:
            if problem := permissions.path_problem(path):
                return f"{problem}; refusing to go on (fix its owner/mode, or set supervisor.allow_shared_dir)"
        return None

    def _write_config(self) -> None:
        """Record the resolved config for ranks and requeues, unless it contradicts the checkpoints:
        the recorded config must stay the one that can resume them."""
        architecture = self.cfg.model.architecture().model_dump(exclude={"published_params"})
        mismatch = recorded_mismatch(self.cfg.checkpoint.root(self.run_dir), architecture)
        if mismatch:
            raise ConfigError(f"{self.run_dir} holds checkpoints of another model ({mismatch}); config.yaml "
                              "not overwritten: use a new run dir, or the model settings of the checkpoints")
        atomic_write(self.config_path, dump_config(self.cfg))

    # -- end of an attempt -------------------------------------------------------------------------

    def _report(self, outcome: NodeOutcome) -> None:
        """Post this node's account of the attempt; a node condemned this attempt reports UNHEALTHY."""
        assert self.coord is not None
        self.coord.report(self.attempt, NodeReport(
            self.node, NodeOutcome.UNHEALTHY if self._unhealthy is not None else outcome, self.tracker.start_step,
            self.tracker.reached_step, self._unhealthy, self._final_exit))

    def _decide(self) -> AttemptDecision:
        """Node 0 turns every node's report into the decision; the others wait for it."""
        assert self.coord is not None
        self._set_state(State.DECIDING)
        if self.node == 0:
            reports = self._wait_for(lambda: self.coord.all_reports(self.attempt), self.scfg.store_timeout_s)
            self.coord.publish_decision(self.attempt, self._node0_decision(reports or self.coord.reports(self.attempt)))
        decision = self._wait_for(lambda: self.coord.decision(self.attempt), self.scfg.store_timeout_s)
        if decision is None:
            raise CoordinationLost(f"no decision for attempt {self.attempt} within {self.scfg.store_timeout_s:g}s")
        failure = self.coord.restart_requested(self.attempt)
        if failure is not None:
            self.last_failure = failure
        return decision

    def _node0_decision(self, reports: Mapping[int, NodeReport]) -> AttemptDecision:
        """Gather what node 0 knows (the store's stop request, the newest committed step), decide, record."""
        assert self.coord is not None
        stop = self.coord.stop_requested()
        context = AttemptContext(
            nnodes=self.topo.nnodes, restarts_done=self.restarts, no_progress_streak=self.no_progress_streak,
            train_steps=self.cfg.train.steps, stop=stop, newest_committed=self._newest_committed(),
            save_on_finish=self.cfg.checkpoint.save_on_finish)
        decision = decisions.decide_attempt(reports, context, self.scfg)
        self.no_progress_streak = decision.no_progress_streak
        self._record_decision(decision, stop)
        return decision

    def _newest_committed(self) -> int | None:
        """The newest committed step in the progress directory; an unreadable directory has none."""
        try:
            return progress.newest_complete_step(self.progress_root)
        except OSError as err:
            print(f"resilient: node {self.node}: cannot read {self.progress_root}: {err}", file=sys.stderr)
            return None

    def _record_decision(self, d: AttemptDecision, stop: StopRequest | None) -> None:
        """Node 0's ledger record of its decision (and of the storage fault the decision found)."""
        assert self.coord is not None
        if d.final_step_uncommitted:
            self._storage_fault(d.reason)
        failure = self.coord.restart_requested(self.attempt)
        if d.restart:
            ledger.append(self.run_dir, LedgerEvent.RESTART, attempt=self.attempt + 1, backoff_seconds=d.backoff_s,
                          reason=f"{failure['reason'] if failure else 'restart'}; {d.reason}", origin=_origin(failure))
        elif d.outcome is Outcome.FINISHED:
            ledger.append(self.run_dir, LedgerEvent.FINISHED, step=d.reached_step)
        elif d.outcome is Outcome.PREEMPTED:
            ledger.append(self.run_dir, LedgerEvent.PREEMPTED, step=d.reached_step,
                          node=stop.node if stop else self.node, origin=_stop_origin(stop),
                          reason=stop.reason if stop else None)
        else:
            ledger.append(self.run_dir, LedgerEvent.GAVE_UP, reason=d.reason, exit_code=int(d.exit_code))

    def _finish(self, decision: AttemptDecision) -> ExitCode:
        """Publish the final state, then let node 0 keep the store up until every node has read the decision."""
        assert self.coord is not None and decision.outcome is not None
        self._set_state(decision.outcome)
        self.coord.ack(self.attempt)
        if self.node == 0 and self.topo.nnodes > 1:
            self._wait_for(lambda: self.coord.all_acked(self.attempt), _ACK_WAIT_S)
            self._write_status()
        return self._exit_code(decision.outcome, decision.reason)

    def _exit_code(self, outcome: Outcome, reason: str) -> ExitCode:
        code, meaning = exit_code_for(outcome)
        self.metrics.on_exit(code, reason)
        print(f"resilient: node {self.node}: {outcome}: {reason} (exit {int(code)}: {meaning})", file=sys.stderr)
        return code

    # -- status --------------------------------------------------------------------------------------

    def _set_state(self, state: State | Outcome) -> None:
        self.state = state
        self.metrics.set_state(str(state), self.attempt)
        self._status_due.force()  # publish (and on node 0 merge) every state change at once
        self._merge_due.force()
        self._maybe_publish_status()

    def _maybe_publish_status(self) -> None:
        self.calibration.maybe_write()
        if self.coord is None or not self._status_due.due():
            return
        self.stragglers.check()
        rows = publishing.rank_rows(self.ranks, self.tracker.views, self.topo, time.time())
        for row in rows:
            if row["heartbeat_age_s"] is not None and row["exit_code"] is None:
                self.metrics.heartbeat_age(row["rank"], row["heartbeat_age_s"])
        spare = None
        if self.spares is not None:
            spare = {"count": len(self.spares), "rss_bytes": self.spares.rss_bytes()}
            self.metrics.on_spares(spare["count"], spare["rss_bytes"])
        self.coord.publish_status(publishing.node_status(self.topo, self.state, rows, self.metrics_port, spare))
        if self.node == 0 and self._merge_due.due():
            self._write_status()

    def _write_status(self) -> None:
        publishing.write_run_status(self.run_dir, self.coord.node_statuses(), state=self.state,
                                    attempt=self.attempt, reached_step=self.tracker.reached_step,
                                    restarts=self.restarts, last_failure=self.last_failure,
                                    stop=self.coord.stop_requested())

    # -- waiting, signals, files -------------------------------------------------------------------

    def _on_forged(self, key: str, reason: str) -> None:
        """A store value that fails authentication: ignored, and recorded once per key."""
        if key not in self._forged_keys:
            self._forged_keys.add(key)
            ledger.append(self.run_dir, LedgerEvent.AUTH_REJECTED, node=self.node, key=key, reason=reason)
            print(f"resilient: node {self.node}: rejected coordination value: {reason}", file=sys.stderr)

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
                self.coord.request_stop(StopKind.PREEMPTED, f"node {self.node}: supervisor received {self._signal}")
            got = probe()
            if got is not None or time.monotonic() > deadline:
                return got
            self._maybe_publish_status()
            with selectors.DefaultSelector() as sel:
                sel.register(self._wake_r, selectors.EVENT_READ)
                poll = self.coord.wait_s if self.coord is not None else self.scfg.poll_interval_s
                sel.select(min(poll, max(0.0, deadline - time.monotonic())))
            self._drain_wakeups()


def _origin(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Who (authenticated) asked for a restart."""
    return None if record is None else {k: record.get(k) for k in ("node", "host", "pid")}


def _stop_origin(stop: StopRequest | None) -> dict[str, Any] | None:
    """Who (authenticated) asked for a stop."""
    return None if stop is None else {"node": stop.node, "host": stop.host, "pid": stop.pid}


def _stop_seen_reason(stop: StopRequest | None) -> str:
    if stop is None:  # the poll saw the key, the read lost it: the store is going away
        return "stop requested by another node"
    return f"stop requested by node {stop.node} ({stop.host}, pid {stop.pid}): {stop.reason}"


def _next_attempt(run_dir: Path) -> int:
    """Attempt numbers continue across requeued allocations, so log names never collide."""
    seen = [e["attempt"] for e in ledger.read(run_dir) if e.get("event") == LedgerEvent.ATTEMPT_START]
    return max(seen) + 1 if seen else 0

