"""The per-node supervisor: spawn this node's ranks (or stand by as a spare), watch them, restart all
nodes together, replace a failed node with a spare, survive the coordinator's loss, stop cleanly.

One attempt, on every slot of the allocation:
  the coordinator's plan for the attempt (which slot runs which node rank) -> a node: pre-flight ->
  barrier (store) -> spawn -> watch until: all ranks finished | a local failure (posted as the attempt's
  restart request) | another node's restart request | a lost node (the coordinator's lease table) |
  a stop request -> tear down -> report to the store; a spare: warm standby ranks and health checks ->
  the coordinator decides (restart, with spares in place of failed nodes, or stop with an exit code)
  -> every slot follows the decision. A coordinator that does not answer is replaced by an election
  among the survivors (failover.py); a side without a majority stops and touches nothing.
Ranks are started by `launcher` (on warm spares), heartbeats tracked in `tracking`, failures detected in
`failures`, status published by `publishing`; this module sequences them. All process work happens on the main thread:
PR_SET_PDEATHSIG in the ranks follows the thread that forked them.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from health.actions import Verdict
from resilient.config import RunConfig, dump_config
from resilient.core import ledger
from resilient.core.atomic import atomic_write
from resilient.core.errors import ConfigError, ResilientError, StorageFault
from resilient.core.events import LedgerEvent
from resilient.core.exit_codes import ExitCode
from resilient.core.outcome import Outcome, exit_code_for
from resilient.core.rundir import RunDir
from resilient.core.secret import load_or_create
from resilient.metrics.exporter import NodeMetrics
from resilient.rank.heartbeat import HeartbeatServer
from resilient.report.rank_steps import RankStepLog
from resilient.supervisor import (
    calibration,
    decisions,
    failover,
    failures,
    fencing,
    incidents,
    progress,
    publishing,
    records,
    timeouts,
    watch,
)
from resilient.supervisor import roster as rosters
from resilient.supervisor.auth import Sealer
from resilient.supervisor.calibration import CalibrationStore
from resilient.supervisor.config import RankProtocol
from resilient.supervisor.console import progress_line
from resilient.supervisor.coordination import Access, CoordinationLost, Coordinator, Gate
from resilient.supervisor.decisions import AttemptContext, AttemptDecision
from resilient.supervisor.election import Join
from resilient.supervisor.failover import NoMajority
from resilient.supervisor.failures import Failure, FailureKind
from resilient.supervisor.goodput_refresh import GoodputRefresh
from resilient.supervisor.health_watch import HealthWatch
from resilient.supervisor.launcher import RankLauncher
from resilient.supervisor.liveness import Liveness
from resilient.supervisor.lost_slots import LostSlots
from resilient.supervisor.ranks import RankProcess, free_port, stop_all
from resilient.supervisor.reports import NodeOutcome, NodeReport, RankExit, StopKind, StopRequest
from resilient.supervisor.roster import Role, Roster
from resilient.supervisor.run_dirs import RunDirs
from resilient.supervisor.states import State
from resilient.supervisor.straggler_ledger import StragglerLedger
from resilient.supervisor.topology import Topology
from resilient.supervisor.tracking import HeartbeatTracker, RankView
from resilient.supervisor.wakeups import Wakeups
from trainer.checkpoint.manifest import recorded_mismatch

T = TypeVar("T")


class _PutOut(Exception):
    """The plan puts this slot out of the run."""


# Coordinating a final decision: the coordinator keeps the store up this long for the others to read it.
_ACK_WAIT_S = 10.0


class Supervisor:
    def __init__(self, cfg: RunConfig, topo: Topology, run_dir: Path) -> None:
        self.cfg, self.scfg, self.topo, self.run_dir = cfg, cfg.supervisor, topo, run_dir
        self.slot = topo.slot
        self.node: int | None = None
        """The node rank this slot runs in the current attempt (None: a spare, or not yet planned)."""
        self.roster = rosters.initial(cfg.nodes, topo.slots, topo.hosts)
        """The newest roster this supervisor knows."""
        self.plan = self.roster
        """The roster the current attempt runs with."""
        self.config_path = RunDir(run_dir).config
        self.attempt = 0
        self.first_attempt = 0
        self.restarts = 0
        self.no_progress_streak = 0
        self.state: State | Outcome = State.STARTING
        self.ranks: list[RankProcess] = []
        self.tracker = HeartbeatTracker(self.scfg.step_timeout_window)
        self.calibration = CalibrationStore(
            run_dir,
            self.slot,
            self.tracker,
            calibration.signature(
                cfg.model.model_dump(),
                cfg.parallel.model_dump(),
                cfg.train.global_batch,
                cfg.train.micro_batch,
                cfg.seq_len,
                cfg.nodes,
                self.scfg.nproc_per_node,
                self.scfg.rank_command,
            ),
        )  # seeds the tracker
        self.last_failure: dict[str, Any] | None = None
        self.metrics_port: int | None = None
        self.wakeups: Wakeups | None = None  # signals, once run() installed their handlers
        self._stop_seen = False
        self._status_due = publishing.Throttle(self.scfg.status_interval_s)  # the store's pace once it is open
        self._merge_due = publishing.Throttle(self.scfg.status_interval_s)
        self._final_exit: RankExit | None = None  # a rank's CONFIG_ERROR / CHECKPOINT_DAMAGED this attempt
        self._unhealthy: str | None = None  # this attempt's fatal verdict on this node, naming it
        self._spare_unhealthy: str | None = None  # a spare's own fatal verdict (its lease carries it)
        self._spare_checked = False
        self.coord: Coordinator | None = None
        self.access: Access | None = None
        self.liveness: Liveness | None = None
        self.lost = LostSlots(self.scfg.node_lease_s)
        """The coordinator's lost slots (from its lease reads, or the coordinator it replaced)."""
        self.server: HeartbeatServer | None = None
        self.metrics = NodeMetrics(cfg.metrics, topo.node_name)
        self.metrics.declare_failure_kinds(FailureKind)
        self.health = HealthWatch(
            cfg.health, topo.node_name, run_dir, cfg.checkpoint.root(run_dir), self.scfg.nproc_per_node, self.metrics
        )
        self.stragglers = StragglerLedger(cfg.health, run_dir, topo.node_name, self.metrics)
        self.goodput: GoodputRefresh | None = None  # the first slot's, while metrics are served
        self.rank_steps = RankStepLog(run_dir, self.slot)  # per-rank step times for `resilient report`
        # exit_only: progress is the newest complete checkpoint, hangs are caught only for ranks that send heartbeats.
        self.exit_only = self.scfg.rank_protocol is RankProtocol.EXIT_ONLY
        self.progress_root = progress.progress_dir(self.scfg.progress_dir, cfg.checkpoint.dir, run_dir)
        self.launcher: RankLauncher | None = None  # once the heartbeat socket is open
        self.dirs: RunDirs | None = None  # captured at the start of run()

    # -- entry point --------------------------------------------------------------------------------

    def run(self) -> int:
        self.wakeups = Wakeups((signal.SIGTERM, signal.SIGINT, signal.Signals[self.scfg.preempt_signal]))
        try:
            return int(self._run())
        except CoordinationLost as err:
            minority = isinstance(err, NoMajority)
            self.coord = None  # status stays local from here on; a minority writes no decision
            self._record_failure(self._failure(FailureKind.SUPERVISOR, None, str(err)))
            records.coordinator_lost(self.run_dir, self.slot, self.attempt, str(err), minority=minority)
            # A minority's ranks are killed at once: a stop signal would let them save (touch checkpoints).
            stop_all(self.ranks, 0.0 if minority else self.scfg.termination_grace_s)
            outcome = Outcome.PREEMPTED if self._stop_seen and not minority else Outcome.COORDINATION_LOST
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
            if self.liveness is not None:
                self.liveness.stop()
            self.calibration.close()
            if self.launcher is not None:
                self.launcher.close()
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
        self.dirs = RunDirs(self.run_dir, [self.run_dir, ckpt_root])
        if self.slot == 0:
            self._write_config()
        self.metrics_port = self.metrics.start()
        if self.slot == 0 and self.metrics_port is not None:
            self.goodput = GoodputRefresh(self.run_dir, self.cfg.metrics.goodput_interval_s, self.metrics).start()
        self.server = HeartbeatServer(RunDir(self.run_dir).heartbeat_socket(self.slot))
        argv = self.scfg.rank_argv(self.config_path, self.run_dir)
        self.launcher = RankLauncher(self.scfg, self.topo, self.run_dir, argv, self.server.path)
        self.launcher.park(self.plan, self.roster.node_rank(self.slot))
        sealer = Sealer(load_or_create(self.run_dir), self.topo.instance)
        complaints = records.StoreComplaints(self.run_dir, self.slot)
        self.access = Access(self.topo, self.scfg, sealer, complaints.forged, complaints.limit)
        self.coord = Coordinator.open(self.access, coordinator=0, epoch=0)
        self._status_due.interval_s = self.coord.intervals.status_s
        self._merge_due.interval_s = self.coord.intervals.merge_s
        self._start_liveness(join_s=self.scfg.store_timeout_s)
        if self.coord.hosting:
            first = _next_attempt(self.run_dir)
            self._set_roster(self.roster)
            self.coord.publish_plan(first, self.roster)
            self.coord.publish_first_attempt(first)
        first = self._wait_for(self.coord.first_attempt, self.scfg.store_timeout_s)
        if first is None:
            raise CoordinationLost(
                f"the coordinator did not publish the first attempt within {self.scfg.store_timeout_s:g}s"
            )
        self.attempt = self.first_attempt = first
        self.calibration.begin(first)
        ledger.append(
            self.run_dir,
            LedgerEvent.RUN_START,
            attempt=first,
            node=self.slot,
            slot=self.slot,
            host=self.topo.node_name,
            role=str(self.roster.role(self.slot)),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)),
        )
        while True:
            decision = self._attempt_and_decision()
            if decision is None:
                return self._leave()
            if not decision.restart:
                return self._finish(decision)
            self.restarts += 1
            self.metrics.on_restart()
            self._set_state(State.BACKOFF)
            self._sleep_interruptibly(decision.backoff_s)
            self.attempt += 1

    def _attempt_and_decision(self) -> AttemptDecision | None:
        """Run attempt `self.attempt` in this slot's role, report, and get the coordinator's decision, across
        elections; None when the plan puts this slot out of the run."""
        try:
            return failover.attempt_then_decision(self._attempt_in_role, self._report, self._decide, self._failover)
        except _PutOut:
            return None

    def _attempt_in_role(self) -> NodeOutcome | None:
        assert self.coord is not None
        coord = self.coord
        plan = self._wait_for(lambda: coord.plan(self.attempt), self.scfg.store_timeout_s)
        if plan is None:
            raise CoordinationLost(f"no plan for attempt {self.attempt} within {self.scfg.store_timeout_s:g}s")
        self._adopt(plan)
        role = plan.role(self.slot)
        if role is Role.OUT:
            raise _PutOut()
        if role is Role.NODE:
            return self._one_attempt()
        self._stand_by()
        return None

    def _adopt(self, plan: Roster) -> None:
        self.plan = plan
        if plan.version >= self.roster.version:
            self.roster = plan
        self.node = plan.node_rank(self.slot)

    # -- one attempt -------------------------------------------------------------------------------

    def _one_attempt(self) -> NodeOutcome:
        """Run attempt `self.attempt` as node rank `self.node` until it ends here; returns how."""
        assert self.coord is not None and self.node is not None
        self.tracker.new_attempt()
        self._final_exit = self._unhealthy = None
        self._set_state(State.PREFLIGHT)
        assert self.dirs is not None
        if changed := self.dirs.changed():  # every node stops; the coordinator decides STORAGE_FAULT
            self._storage_fault(changed)
            return NodeOutcome.PREEMPTED
        if not self.scfg.allow_shared_dir and (shared := self.dirs.shared()):  # made shared since the start
            self._final_exit = RankExit(int(ExitCode.CONFIG_ERROR), shared)
            self._record_failure(self._failure(FailureKind.SUPERVISOR, None, shared))
            return NodeOutcome.FAILED
        verdict = self.health.preflight()
        # every node stops; the coordinator decides STORAGE_FAULT
        if verdict is not None and verdict.verdict is Verdict.STORAGE:
            self._storage_fault(verdict.reason)
            return NodeOutcome.PREEMPTED
        if verdict is not None:
            self._post_failure(self._failure(FailureKind.HEALTH, None, verdict.reason))
            self._unhealthy = verdict.reason
            return NodeOutcome.UNHEALTHY
        if self.node == 0:
            self.coord.publish_master_port(self.attempt, free_port())
        self._set_state(State.WAITING)
        self.coord.arrive(self.attempt, self.node)
        gate = self._wait_for(self._barrier, self.scfg.store_timeout_s)
        if gate is None:
            self._post_failure(
                self._failure(
                    FailureKind.SUPERVISOR,
                    None,
                    f"not all {len(self.plan.nodes)} nodes joined attempt "
                    f"{self.attempt} within {self.scfg.store_timeout_s:g}s",
                )
            )
            return NodeOutcome.FAILED
        if gate is not Gate.GO:
            return NodeOutcome.PREEMPTED if gate is Gate.STOP else NodeOutcome.FAILED
        start = progress.newest_complete_step(self.progress_root) if self.exit_only else None
        try:
            self._spawn_ranks()
        except StorageFault as err:  # a rank's log cannot be opened safely: nothing is written through it
            stop_all(self.ranks, 0.0)
            self._storage_fault(str(err))
            return NodeOutcome.PREEMPTED
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
        return end

    def _stand_by(self) -> None:
        """A spare's attempt: warm standby ranks, health checks (pre-flight once, then the monitor), until the
        attempt's decision is out (the coordinator: until every report it waits for is in)."""
        assert self.coord is not None
        self._set_state(State.STANDBY)
        if not self._spare_checked:
            self._spare_checked = True
            verdict = self.health.preflight()
            if verdict is not None:
                self._spare_unfit(verdict.reason)
        self.health.start_monitor()
        try:

            def over() -> bool | None:
                if (verdict := self.health.fatal()) is not None and self._spare_unhealthy is None:
                    self._spare_unfit(verdict.reason)
                if self.coord.hosting:
                    return True if self._reports_ready() is not None else None
                return True if self.coord.decision(self.attempt) is not None else None

            self._wait_for(over, float("inf"))
        finally:
            self.health.stop_monitor()
        return None

    def _spare_unfit(self, reason: str) -> None:
        """A spare found unfit: its lease says so, and the coordinator takes it off the spares."""
        self._spare_unhealthy = f"node {self.topo.node_name}: {reason}"
        print(f"resilient: slot {self.slot}: spare unfit: {reason}", file=sys.stderr, flush=True)

    def _barrier(self) -> Gate | None:
        assert self.coord is not None
        gate = self.coord.barrier(self.attempt, self.plan)
        self._stop_seen = self._stop_seen or gate is Gate.STOP
        return gate

    def _spawn_ranks(self) -> None:
        assert self.coord is not None and self.node is not None and self.launcher is not None
        port = self._wait_for(lambda: self.coord.master_port(self.attempt), self.scfg.store_timeout_s)
        if port is None:
            raise CoordinationLost(f"no process-group port for attempt {self.attempt}")
        specs = self.launcher.specs(self.plan, port, self.attempt, self.node, self.calibration.history())
        self.ranks = []
        launched = self.launcher.launch(specs, time.monotonic())
        self.ranks = launched.ranks
        self.tracker.track(
            [RankView(r.spec.rank, r.spec.local_rank, r.pid, last_progress=r.spawned_at) for r in self.ranks]
        )
        ledger.append(
            self.run_dir,
            LedgerEvent.ATTEMPT_START,
            attempt=self.attempt,
            node=self.node,
            slot=self.slot,
            host=self.topo.node_name,
            warm_ranks=launched.warm_ranks,
            spare_ranks=launched.spare_ranks,
            pids=[r.pid for r in self.ranks],
        )

    def _maybe_refill_spares(self, now: float) -> None:
        """Replace the spares the last attempt took, once its ranks step (`spares.refill_due`)."""
        if self.launcher is None or not self.launcher.refill_pending:
            return
        views = [self.tracker.views[r.spec.rank] for r in self.ranks]
        phases = [v.phase if v.last_heartbeat is not None else None for v in views]
        node = self.node if self.node is not None else self.roster.node_rank(self.slot)
        if self.launcher.refill_if_due(now, phases, self.plan, node):
            self._status_due.force()  # their count and memory go out with the next status

    def _watch(self) -> NodeOutcome:
        """Until this attempt ends on this node: FINISHED, FAILED (here or on another node) or PREEMPTED.
        The states and their transitions are `watch.advance`'s; this loop gathers what each poll sees and
        carries the moves out."""
        assert self.coord is not None and self.server is not None
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ)
        assert self.wakeups is not None
        sel.register(self.wakeups.reader, selectors.EVENT_READ)
        for r in self.ranks:
            sel.register(r.pidfd, selectors.EVENT_READ, r)
        state = watch.Watch()
        next_store_poll = 0.0
        try:
            while True:
                for key, _ in sel.select(self.coord.intervals.poll_s):
                    if isinstance(key.data, RankProcess):
                        sel.unregister(key.fileobj)
                now = time.monotonic()
                exits = self._observe(now)
                stop: tuple[StopKind, str] | None = None
                failure: Failure | None = None
                peer: dict[str, Any] | None = None
                succeeded = all(r.returncode == 0 for r in self.ranks)
                if state.mode is not watch.Mode.STOPPING:
                    stop = self._local_stop(exits)
                    if stop is None and (failure := self._detect(exits, now)) is not None:
                        if failure.kind is FailureKind.STORAGE:  # save while there is room
                            stop, failure = (StopKind.STORAGE, self._storage_fault(failure.reason)), None
                    if stop is None and failure is None and not succeeded and now >= next_store_poll:
                        next_store_poll = now + self.coord.intervals.poll_s
                        stop, peer = self._store_verdict()
                seen = watch.Seen(
                    stop=stop is not None,
                    failed=failure is not None or peer is not None,
                    all_exited=all(r.returncode is not None for r in self.ranks),
                    all_succeeded=succeeded,
                    all_done=timeouts.all_done(
                        [(self.tracker.views[r.spec.rank].phase, r.returncode) for r in self.ranks]
                    ),
                )
                state, move = watch.advance(
                    state, seen, now, stop_grace_s=self.scfg.preempt_grace_s, done_grace_s=self.scfg.done_grace_s
                )
                match move:
                    case watch.Move.BEGIN_STOP:
                        assert stop is not None
                        self._begin_preempt(stop[1], stop[0])
                    case watch.Move.PREEMPTED:
                        return NodeOutcome.PREEMPTED
                    case watch.Move.PREEMPT_KILLING_REST:
                        late = f"did not stop within {self.scfg.preempt_grace_s:g}s of the stop request"
                        self._stop_rest(late + "; killing them", 0.0)
                        return NodeOutcome.PREEMPTED
                    case watch.Move.FAILED:
                        self._capture_failure(failure, peer)
                        return NodeOutcome.FAILED
                    case watch.Move.FINISHED:
                        return NodeOutcome.FINISHED
                    case watch.Move.FINISH_STOPPING_REST:
                        late = f"still running {self.scfg.done_grace_s:g}s after every rank reported done"
                        self._stop_rest(late + "; stopping them", self.scfg.termination_grace_s)
                        return NodeOutcome.FINISHED
                if state.mode is not watch.Mode.STOPPING:
                    self._maybe_refill_spares(now)
                    self._maybe_publish_status()
        finally:
            sel.close()

    def _stop_rest(self, why: str, grace_s: float) -> None:
        """Stop the ranks still running at the end of an attempt's grace, saying why."""
        late = [r.spec.rank for r in self.ranks if r.returncode is None]
        print(f"resilient: node {self.node}: ranks {late} {why}", file=sys.stderr)
        stop_all(self.ranks, grace_s)

    def _observe(self, now: float) -> list[RankProcess]:
        """One poll's intake: signal wakeups, heartbeats, leases; returns the ranks that exited just now."""
        assert self.server is not None and self.wakeups is not None
        self.wakeups.drain()
        for hb in self.server.drain():
            if self.tracker.observe(hb, self.attempt, now):
                self.metrics.on_heartbeat(hb["rank"], hb.get("local_rank", 0), hb)
                self.stragglers.observe(hb)
                self.rank_steps.observe(hb)
                if line := progress_line(hb, self.cfg.train):
                    print(line, file=sys.stderr, flush=True)
        self._check_liveness(now)
        return [r for r in self.ranks if r.returncode is None and r.poll(now) is not None]

    def _local_stop(self, exits: list[RankProcess]) -> tuple[StopKind, str] | None:
        """A stop asked on this node: a signal to the supervisor, or a rank that exited PREEMPTED."""
        assert self.wakeups is not None
        if self.wakeups.received is not None:
            return StopKind.PREEMPTED, f"supervisor received {self.wakeups.received}"
        if stopped := next((r for r in exits if r.returncode == ExitCode.PREEMPTED), None):
            said = self.tracker.views[stopped.spec.rank].done_message
            return StopKind.PREEMPTED, f"rank {stopped.spec.rank} exited PREEMPTED" + (f": {said}" if said else "")
        return None

    def _store_verdict(self) -> tuple[tuple[StopKind, str] | None, dict[str, Any] | None]:
        """What the other nodes asked through the store (one round trip): (a stop, another node's restart request)."""
        assert self.coord is not None
        seen = self.coord.poll(self.attempt)
        if seen is Gate.STOP:
            return (StopKind.PREEMPTED, _stop_seen_reason(self.coord.stop_requested())), None
        if seen is Gate.RESTART:
            return None, self.coord.restart_requested(self.attempt)
        return None, None

    def _capture_failure(self, failure: Failure | None, peer: dict[str, Any] | None) -> None:
        """Evidence before teardown (stacks of a hang, a crash's log tail) in RUN_DIR/incidents/: this node's
        failure, posted as the attempt's restart request, or this node's stacks added to another node's incident."""
        targets = incidents.targets(self.ranks, self.tracker.views)
        if failure is not None:
            incident = incidents.capture(
                self.run_dir, self.attempt, str(failure.kind), failure.rank, failure.reason, targets, node=self.node
            )
            self._post_failure(dataclasses.replace(failure, incident=incident))
        elif peer is not None:
            incidents.capture(
                self.run_dir,
                self.attempt,
                peer.get("kind", ""),
                peer.get("rank"),
                peer.get("reason", ""),
                targets,
                node=self.node,
                peer=True,
            )

    def _detect(self, exits: list[RankProcess], now: float) -> Failure | None:
        """This node's first failure now: a reported error, a bad exit, a hang, a fatal health verdict."""
        failure = (
            failures.reported_error(self.tracker, self.node)
            or failures.exit_failure(exits, self.node, self.tracker.current_step(), now)
            or failures.hang_failure(self.ranks, self.tracker, self.scfg, self.node, now, heard_only=self.exit_only)
        )
        if failure is None and (verdict := self.health.fatal()) is not None:
            kind = FailureKind.STORAGE if verdict.verdict is Verdict.STORAGE else FailureKind.HEALTH
            failure = self._failure(kind, None, verdict.reason)
            if kind is FailureKind.HEALTH:
                self._unhealthy = verdict.reason
        if failure is None and self.dirs is not None and (changed := self.dirs.changed_now(now)):
            failure = self._failure(FailureKind.STORAGE, None, changed)
        if failure is not None:
            rank_exit = failures.rank_exit(failure, exits, self.tracker)
            self._judge_rank_exit(rank_exit)
            if rank_exit is not None and rank_exit.code == ExitCode.STORAGE_FAULT:  # the rank found storage trouble
                failure = dataclasses.replace(failure, kind=FailureKind.STORAGE)
        return failure

    def _judge_rank_exit(self, rank_exit: RankExit | None) -> None:
        """A rank's exit code that is a verdict, not a crash: CONFIG_ERROR / CHECKPOINT_DAMAGED end the run;
        UNHEALTHY_NODE condemns this node, recorded like a fatal health check (a spare takes its place, or
        `slurm on-exit` requeues the job without it)."""
        if rank_exit is None:
            return
        if decisions.rank_exit_is_final(rank_exit.code) and self._final_exit is None:
            self._final_exit = rank_exit
        elif decisions.rank_exit_condemns_node(rank_exit.code) and self._unhealthy is None:
            self._unhealthy = (
                f"node {self.topo.node_name}: {rank_exit.reason} (UNHEALTHY_NODE: the rank found this node unfit)"
            )
            ledger.append(
                self.run_dir,
                LedgerEvent.HEALTH,
                node=self.topo.node_name,
                severity="fatal",
                check="rank.exit",
                reason=self._unhealthy,
            )

    def _begin_preempt(self, reason: str, kind: StopKind) -> None:
        assert self.coord is not None
        self._stop_seen = True
        self.coord.request_stop(kind, f"node {self.node}: {reason}")
        self._set_state(State.PREEMPTING)
        for r in self.ranks:
            r.signal_rank(self.scfg.stop_signal())

    # -- liveness, leases, elections -----------------------------------------------------------------

    def _start_liveness(self, join_s: float) -> None:
        assert self.access is not None and self.coord is not None
        store = self.coord.second_connection(self.access)
        self.liveness = Liveness(
            store,
            self.slot,
            self.topo.slots,
            self.scfg.node_lease_s,
            read_all=self.coord.hosting,
            join_s=join_s,
            value=self._lease_value,
        ).start()

    def _lease_value(self) -> dict[str, Any]:
        """What this slot's lease tells the coordinator besides being alive (read on the lease thread)."""
        return {
            "host": self.topo.node_name,
            "role": str(self.roster.role(self.slot)),
            "node": self.node,
            "unhealthy": self._spare_unhealthy,
        }

    def _check_liveness(self, now: float) -> None:
        """Every slot: a lease renewal that went unanswered means the coordinator is lost. The coordinator:
        find lost and unfit slots (leases), act on them, and stop if it no longer holds a majority."""
        if self.liveness is not None and self.liveness.failed is not None:
            raise CoordinationLost(f"coordinator slot {self.roster.coordinator} lost: {self.liveness.failed}")
        if self.coord is None or not self.coord.hosting or self.liveness is None:
            return
        unfit = {
            s: str(v["unhealthy"]) for s in self.roster.spares if (v := self.liveness.value_of(s)).get("unhealthy")
        }
        found = self.lost.look(now, self.roster, self.slot, self.topo.slots, self.liveness, unfit)
        if found is None:
            return
        for slot, reason in found.newly_lost.items():
            self._on_lost(slot, reason)
        if found.gone_spares:
            self._set_roster(rosters.drop_spares(self.roster, found.gone_spares))
            for slot, reason in found.gone_spares.items():
                kind = "lost" if slot in self.lost.lost else "unhealthy"
                records.bad_node(
                    self.run_dir, self.roster, slot, node_rank=None, kind=kind, reason=reason, attempt=self.attempt
                )

    def _on_lost(self, slot: int, reason: str) -> None:
        """A slot's lease expired: a node rank it runs ends the attempt now (every node stops its ranks
        without waiting for a collective timeout), and the slot is fenced."""
        host = self.roster.name(slot)
        print(f"resilient: slot {self.slot}: {host} (slot {slot}) lost: {reason}", file=sys.stderr, flush=True)
        node = self.plan.node_rank(slot)
        if node is not None and self.lost.first_post(self.attempt, slot):
            failure = Failure(
                FailureKind.NODE_LOST,
                None,
                node,
                self.tracker.current_step(),
                f"node {node} ({host}, slot {slot}) lost: {reason}",
            )
            self._record_failure(failure)  # recorded even when another failure came first: it is the culprit
            self.coord.request_restart(
                self.attempt,
                kind=str(failure.kind),
                rank=None,
                step=failure.step,
                reason=failure.reason,
                culprit_slot=slot,
            )
        self._fence(slot)

    def _fence(self, slot: int) -> None:
        roster, pid = self.roster, self.roster.pid(slot)
        fencing.fence(
            roster.host(slot), pid, lambda ok, detail: records.fenced(self.run_dir, roster, slot, pid, ok, detail)
        )

    def _set_roster(self, roster: Roster) -> None:
        """The coordinator's new roster: published with the supervisors' pids its leases know."""
        assert self.coord is not None and self.liveness is not None
        leases = {s: self.liveness.value_of(s) for s in range(self.topo.slots)}
        self.roster = rosters.with_identities(
            roster,
            {**{s: v.get("pid") for s, v in leases.items()}, self.slot: os.getpid()},
            {**{s: v.get("host") for s, v in leases.items()}, self.slot: self.topo.node_name},
        )
        self.coord.publish_roster(self.roster)
        self.metrics.on_roster(len(self.roster.spares), len(self.roster.out), self.topo.slots - self.cfg.nodes)

    def _failover(self, err: CoordinationLost) -> None:
        """The coordinator is lost: stop the ranks (they cannot go on without it), elect the next one with
        the other survivors, continue on its store. Raises NoMajority on the minority side."""
        assert self.access is not None
        lost = self.roster.coordinator
        print(f"resilient: slot {self.slot}: {err}; electing a new coordinator", file=sys.stderr, flush=True)
        records.coordinator_lost(self.run_dir, self.slot, self.attempt, str(err), minority=False)
        stop_all(self.ranks, 0.0)
        stop_record = self.coord.stop_record() if self.coord is not None else None
        if self.liveness is not None:
            self.liveness.stop()
        if self.coord is not None:
            self.coord.close()
        self.coord = None
        self._set_state(State.ELECTING)
        coord, won, takeover = failover.elect(self.access, Join.of(self, stop_record), lost)
        self.coord = coord
        self._status_due.interval_s = coord.intervals.status_s
        self._merge_due.interval_s = coord.intervals.merge_s
        takeover.carry_on(self)
        # The attempt that ended with the loss is judged against the newest roster any survivor had (the
        # plan of the furthest attempt: a decision publishes its next plan before the decision itself).
        self.plan = self.roster
        self._start_liveness(join_s=failover.election_timeout_s(self.scfg))
        if won:
            reason = f"coordinator slot {lost} ({self.roster.name(lost)}) lost: {err}"
            self.lost.after_election(lost, reason)
            if takeover.stop is not None:
                coord.adopt_stop(dict(takeover.stop))
                self._stop_seen = True
            coord.publish_first_attempt(self.first_attempt)
            coord.publish_plan(self.attempt, self.plan)
            self._set_roster(self.roster)
            if self.roster.role(lost) is Role.OUT:  # a lost spare; a lost node is replaced by the decision
                records.bad_node(
                    self.run_dir, self.roster, lost, node_rank=None, kind="lost", reason=reason, attempt=self.attempt
                )
            records.elected(self.run_dir, self.topo.node_name, self.slot, self.roster.epoch, lost, self.attempt)
            self._fence(lost)
        self.node = self.plan.node_rank(self.slot) if self.plan.nodes else None
        self.lost.look_now()

    # -- failures ----------------------------------------------------------------------------------

    def _failure(self, kind: FailureKind, rank: int | None, reason: str) -> Failure:
        return Failure(
            kind, rank, self.node if self.node is not None else self.slot, self.tracker.current_step(), reason
        )

    def _post_failure(self, failure: Failure) -> None:
        """Ask every node to restart; only the first request of an attempt is recorded as its failure."""
        assert self.coord is not None
        if self.coord.request_restart(
            self.attempt, kind=str(failure.kind), rank=failure.rank, step=failure.step, reason=failure.reason
        ):
            self._record_failure(failure)

    def _record_failure(self, failure: Failure) -> None:
        self.last_failure = failure.record()
        ledger.append(self.run_dir, LedgerEvent.FAILURE, **self.last_failure)
        self.calibration.on_failure(self.last_failure, self.attempt)
        self.metrics.on_failure(failure.kind)
        print(f"resilient: slot {self.slot} attempt {self.attempt}: {failure.kind}: {failure.reason}", file=sys.stderr)

    # -- storage -----------------------------------------------------------------------------------

    def _storage_fault(self, reason: str) -> str:
        """Record storage trouble (ledger, metric, stderr) as its own fault class; returns the reason."""
        ledger.append(
            self.run_dir, LedgerEvent.STORAGE_FAULT, node=self.node, step=self.tracker.current_step(), reason=reason
        )
        self.metrics.on_storage_fault()
        print(f"resilient: node {self.node}: storage fault: {reason}", file=sys.stderr, flush=True)
        if self.coord is not None:
            self.coord.request_stop(StopKind.STORAGE, reason)  # every node saves and stops; first request wins
        return reason

    def _write_config(self) -> None:
        """Record the resolved config for ranks and requeues, unless it contradicts the checkpoints:
        the recorded config must stay the one that can resume them."""
        architecture = self.cfg.model.architecture().model_dump(exclude={"published_params"})
        mismatch = recorded_mismatch(self.cfg.checkpoint.root(self.run_dir), architecture)
        if mismatch:
            raise ConfigError(
                f"{self.run_dir} holds checkpoints of another model ({mismatch}); config.yaml "
                "not overwritten: use a new run dir, or the model settings of the checkpoints"
            )
        atomic_write(self.config_path, dump_config(self.cfg))

    # -- end of an attempt -------------------------------------------------------------------------

    def _report(self, outcome: NodeOutcome) -> None:
        """Post this node's account of the attempt; a node condemned this attempt reports UNHEALTHY. A spare
        slot (no node rank) has nothing to report, even after a failover."""
        assert self.coord is not None
        if self.node is None:
            return
        self.coord.report(
            self.attempt,
            NodeReport(
                self.node,
                NodeOutcome.UNHEALTHY if self._unhealthy is not None else outcome,
                self.tracker.start_step,
                self.tracker.reached_step,
                self._unhealthy,
                self._final_exit,
                self.slot,
            ),
        )

    def _reports_ready(self) -> dict[int, NodeReport] | None:
        """The coordinator: every report it waits for (node ranks whose slot is not lost), once all are in."""
        assert self.coord is not None
        self._check_liveness(time.monotonic())
        got = self.coord.reports(self.attempt, self.plan, range(len(self.plan.nodes)))
        return None if self.lost.waiting_for(self.plan, got) else got

    def _decide(self) -> AttemptDecision:
        """The coordinator turns every node's report into the decision; the others wait for it."""
        assert self.coord is not None
        self._set_state(State.DECIDING)
        if self.coord.hosting and self.coord.decision(self.attempt) is None:
            reports = self._wait_for(self._reports_ready, self.scfg.store_timeout_s)
            if reports is None:
                reports = self.coord.reports(self.attempt, self.plan, range(len(self.plan.nodes)))
            decision = self._coordinator_decision(reports)
            if decision.restart:
                self._plan_next(decision)
            self.coord.publish_decision(self.attempt, decision)
        decision = self._wait_for(lambda: self.coord.decision(self.attempt), self.scfg.store_timeout_s)
        if decision is None:
            raise CoordinationLost(f"no decision for attempt {self.attempt} within {self.scfg.store_timeout_s:g}s")
        failure = self.coord.restart_requested(self.attempt)
        if failure is not None:
            self.last_failure = failure
        return decision

    def _coordinator_decision(self, reports: Mapping[int, NodeReport]) -> AttemptDecision:
        """Gather what the coordinator knows (the store's stop request, the newest committed step, lost nodes,
        spares), decide, record."""
        assert self.coord is not None
        stop = self.coord.stop_requested()
        context = AttemptContext(
            nnodes=len(self.plan.nodes),
            restarts_done=self.restarts,
            no_progress_streak=self.no_progress_streak,
            train_steps=self.cfg.train.steps,
            stop=stop,
            newest_committed=self._newest_committed(),
            save_on_finish=self.cfg.checkpoint.save_on_finish,
            lost=self.lost.node_ranks(self.plan),
            spares=len(self.roster.spares),
        )
        decision = decisions.decide_attempt(reports, context, self.scfg)
        self.no_progress_streak = decision.no_progress_streak
        if decision.final_step_uncommitted:
            self._storage_fault(decision.reason)
        failure = self.coord.restart_requested(self.attempt)
        records.decision(
            self.run_dir,
            decision,
            attempt=self.attempt,
            failure=failure,
            stop=stop,
            plan=self.plan,
            roster=self.roster,
            slot=self.slot,
        )
        return decision

    def _plan_next(self, decision: AttemptDecision) -> None:
        """The coordinator: the roster of the next attempt (spares in place of the faulty nodes), published
        before the decision so that whoever reads the decision finds the plan."""
        assert self.coord is not None
        roster = self.roster
        if decision.replace:
            faulty = {f.node: f.reason for f in decision.faulty_nodes}
            roster, replacements, why = rosters.replace_nodes(roster, faulty)
            print(f"resilient: slot {self.slot}: {why}", file=sys.stderr, flush=True)
            kinds = {f.node: f.kind for f in decision.faulty_nodes}  # replacements come in node-rank order
            for r in replacements:
                records.bad_node(
                    self.run_dir,
                    self.roster,
                    r.failed_slot,
                    node_rank=r.node_rank,
                    kind=str(kinds[r.node_rank]),
                    reason=r.reason,
                    attempt=self.attempt,
                    replaced_by=r.spare_slot,
                )
                self.metrics.on_replacement()
        self._set_roster(roster)
        self.coord.publish_plan(self.attempt + 1, self.roster)
        if self.attempt - 2 >= self.first_attempt:
            self.coord.forget(self.attempt - 2)

    def _newest_committed(self) -> int | None:
        """The newest committed step in the progress directory; an unreadable directory has none."""
        try:
            return progress.newest_complete_step(self.progress_root)
        except OSError as err:
            print(f"resilient: slot {self.slot}: cannot read {self.progress_root}: {err}", file=sys.stderr)
            return None

    def _finish(self, decision: AttemptDecision) -> ExitCode:
        """Publish the final state, then let the coordinator keep the store up until every live slot has read
        the decision."""
        assert self.coord is not None and decision.outcome is not None
        self._set_state(decision.outcome)
        try:
            self.coord.ack(self.attempt)
            if self.coord.hosting and self.topo.slots > 1:
                live = self.lost.live(self.roster)
                self._wait_for(lambda: self.coord.all_acked(self.attempt, live), _ACK_WAIT_S)
                self._write_status()
        except CoordinationLost as err:  # the decision is known: the store going away now changes nothing
            print(f"resilient: slot {self.slot}: {err} after the final decision", file=sys.stderr)
        return self._exit_code(decision.outcome, decision.reason)

    def _leave(self) -> ExitCode:
        """The plan puts this slot out of the run (unhealthy, or declared lost while it was frozen): stop
        everything here and exit, touching nothing the run still uses."""
        why = self.plan.why_out(self.slot) or "out of the run"
        stop_all(self.ranks, 0.0)
        if self.launcher is not None:
            self.launcher.close()
        unhealthy = self._unhealthy is not None or self._spare_unhealthy is not None
        outcome = Outcome.UNHEALTHY if unhealthy else Outcome.COORDINATION_LOST
        self.coord = None
        self._set_state(outcome)
        return self._exit_code(outcome, f"slot {self.slot} ({self.topo.node_name}) is out of the run: {why}")

    def _exit_code(self, outcome: Outcome, reason: str) -> ExitCode:
        code, meaning = exit_code_for(outcome)
        self.metrics.on_exit(code, reason)
        print(f"resilient: slot {self.slot}: {outcome}: {reason} (exit {int(code)}: {meaning})", file=sys.stderr)
        return code

    # -- status --------------------------------------------------------------------------------------

    def _set_state(self, state: State | Outcome) -> None:
        self.state = state
        self.metrics.set_state(str(state), self.attempt)
        self._status_due.force()  # publish (and on the coordinator merge) every state change at once
        self._merge_due.force()
        self._maybe_publish_status()

    def _maybe_publish_status(self) -> None:
        self.calibration.maybe_write()
        if self.coord is None or not self._status_due.due():
            return
        self.stragglers.check()
        rows = publishing.rank_rows(self.ranks, self.tracker.views, self.topo, self.node, time.time())
        for row in rows:
            if row["heartbeat_age_s"] is not None and row["exit_code"] is None:
                self.metrics.heartbeat_age(row["rank"], row["heartbeat_age_s"])
        spare = None
        if self.launcher is not None and self.launcher.spares is not None:
            spare = self.launcher.spares.summary()
            self.metrics.on_spares(spare["count"], spare["rss_bytes"])
        role = self.roster.role(self.slot)
        self.coord.publish_status(
            publishing.node_status(
                self.topo,
                self.state,
                rows,
                self.metrics_port,
                spare,
                node=self.node,
                role=str(role),
                unhealthy=self._spare_unhealthy,
            )
        )
        if self.coord.hosting and self._merge_due.due():
            self._write_status()

    def _write_status(self) -> None:
        publishing.write_run_status(
            self.run_dir,
            self.coord.node_statuses(),
            state=self.state,
            attempt=self.attempt,
            reached_step=self.tracker.reached_step,
            restarts=self.restarts,
            last_failure=self.last_failure,
            stop=self.coord.stop_requested(),
            roster=self.roster,
            lost=self.lost.lost,
        )

    # -- waiting, signals, files -------------------------------------------------------------------

    def _sleep_interruptibly(self, seconds: float) -> None:
        assert self.wakeups is not None
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and self.wakeups.received is None:
            self.wakeups.wait(min(left, self.scfg.poll_interval_s))
            self._check_liveness(time.monotonic())
            self._maybe_publish_status()

    def _wait_for(self, probe: Callable[[], T | None], timeout_s: float) -> T | None:
        """Poll `probe` until it returns something or time runs out; a signal meanwhile becomes a stop request;
        liveness is checked on every round (a lost coordinator raises, the coordinator acts on lost slots)."""
        assert self.wakeups is not None
        deadline = time.monotonic() + timeout_s
        while True:
            signalled = self.wakeups.received
            if signalled is not None and not self._stop_seen and self.coord is not None:
                self._stop_seen = True
                self.coord.request_stop(StopKind.PREEMPTED, f"slot {self.slot}: supervisor received {signalled}")
            self._check_liveness(time.monotonic())
            got = probe()
            if got is not None or time.monotonic() > deadline:
                return got
            self._maybe_publish_status()
            self._maybe_refill_spares(time.monotonic())
            poll = self.coord.wait_s if self.coord is not None else self.scfg.poll_interval_s
            self.wakeups.wait(min(poll, deadline - time.monotonic()))


def _stop_seen_reason(stop: StopRequest | None) -> str:
    if stop is None:  # the poll saw the key, the read lost it: the store is going away
        return "stop requested by another node"
    return f"stop requested by node {stop.node} ({stop.host}, pid {stop.pid}): {stop.reason}"


def _next_attempt(run_dir: Path) -> int:
    """Attempt numbers continue across requeued allocations, so log names never collide."""
    seen = [e["attempt"] for e in ledger.read(run_dir) if e.get("event") == LedgerEvent.ATTEMPT_START]
    return max(seen) + 1 if seen else 0
