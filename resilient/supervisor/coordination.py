"""Cross-node coordination of the supervisors through the sealed store hosted by node 0.

The real supervisor (daemon.py) and the scale simulator (bench/scale/simulate.py) both drive this
class, so the bench measures the code that runs in production. Values are typed records (reports.py,
decisions.py), encoded for the store in wire.py.

Keys (values sealed, see auth.py; `N` is a node, `A` an attempt):
  ctl                          wake-up counter, bumped after every write the others wait for: a node
                               polls it (one round trip) and reads the keys below only when it moved
  run/first_attempt            attempt number of this job's first attempt (node 0)
  stop                         first stop request {kind, reason, node, pid, host}; never cleared
  a/A/master_port              rank 0's process-group port for attempt A (node 0)
  a/A/ready/N                  node N is ready to spawn attempt A
  a/A/go                       node 0 saw every node ready: the attempt's barrier is open
  a/A/restart                  first restart request of attempt A {kind, rank, step, reason, node, pid, host}
  a/A/report/N                 node N's account of how attempt A ended on it
  a/A/decision                 node 0's verdict for attempt A: restart (with backoff) or stop (exit code)
  a/A/ack/N                    node N read the final decision (node 0 keeps the store up until all did)
  status/N                     node N's latest status summary (node 0 merges them into status.json)
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from resilient.core.errors import ResilientError
from resilient.core.exit_codes import ExitCode
from resilient.supervisor import wire
from resilient.supervisor.auth import Forged, Sealer
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.decisions import AttemptDecision
from resilient.supervisor.reports import NodeReport, StopKind, StopRequest
from resilient.supervisor.store import SealedStore, connect_store, host_store
from resilient.supervisor.topology import Topology


class Gate(enum.Enum):
    """What a node waiting at an attempt's barrier, or watching a running attempt, is told."""

    GO = "go"
    """Every node is ready: spawn the ranks."""
    STOP = "stop"
    """A stop was requested: save and stop."""
    RESTART = "restart"
    """A node posted a failure: tear down for the next attempt."""


class CoordinationLost(ResilientError):
    """The store on node 0 cannot be reached (its supervisor is gone)."""

    exit_code = ExitCode.COORDINATOR_LOST


@dataclass(frozen=True)
class Intervals:
    poll_s: float
    """Store poll of a running attempt (one round trip)."""
    wait_s: float
    """Store poll while waiting at a barrier or for a decision."""
    leader_wait_s: float
    """Node 0's poll while it waits for every node (one round trip whatever the node count)."""
    status_s: float
    """Each node's status publication."""
    merge_s: float
    """Node 0's merge of every node's status into status.json (its CPU grows with the node count)."""
    reason: str


# Merging 1024 node summaries every second took ~20% of a core on node 0 in bench/scale (opening, parsing,
# writing 8192 ranks); at most 512 a second bounds that share whatever the node count.
_MERGED_NODES_PER_S = 512


def intervals(nnodes: int, cfg: SupervisorConfig) -> Intervals:
    """Per-node store poll and status intervals that keep the store within `cfg.store_ops_budget`:
    at steady state half of it for the wake-up polls (one round trip each) and a quarter for status
    writes; the waits of a restart (a second or so) poll up to 4x faster within the same half."""
    poll = max(cfg.poll_interval_s, nnodes / (0.5 * cfg.store_ops_budget))
    wait = max(cfg.poll_interval_s / 4, nnodes / (0.5 * cfg.store_ops_budget))
    status = max(cfg.status_interval_s, nnodes / (0.25 * cfg.store_ops_budget))
    merge = max(status, nnodes / _MERGED_NODES_PER_S)
    load = nnodes / poll + nnodes / status
    return Intervals(poll, wait, cfg.poll_interval_s / 4, status, merge,
                     f"{nnodes} node(s) poll every {poll:.3g}s (waits: {wait:.3g}s) and publish status every "
                     f"{status:.3g}s: ~{load:.0f} store ops/s of the {cfg.store_ops_budget:g} budget; "
                     f"status.json every {merge:.3g}s")


def _guard(fn):
    def wrapped(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (RuntimeError, OSError, Forged) as err:  # DistStoreError / DistNetworkError subclass RuntimeError
            raise CoordinationLost(f"coordination store at {self.address} lost: {str(err).splitlines()[0]}") from None
    return wrapped


class Coordinator:
    def __init__(self, store: SealedStore, node: int, nnodes: int, cfg: SupervisorConfig, address: str,
                 host: str | None = None) -> None:
        self.store, self.node, self.nnodes, self.address = store, node, nnodes, address
        self.intervals = intervals(nnodes, cfg)
        self.wait_s = self.intervals.leader_wait_s if node == 0 else self.intervals.wait_s
        self.origin = {"node": node, "pid": os.getpid(), "host": host or socket.gethostname()}
        self._ctl: int | None = None
        self._cache: dict[str, Any] = {}
        self._missed_at: dict[str, int | None] = {}
        self._status_seen: set[int] = set()
        self._status_blobs: dict[int, tuple[bytes, dict[str, Any]]] = {}
        self._last_status: dict[str, Any] | None = None
        self._listener: socket.socket | None = None

    @classmethod
    def open(cls, topo: Topology, cfg: SupervisorConfig, sealer: Sealer,
             on_forged: Callable[[str, str], None]) -> "Coordinator":
        """Node 0 hosts the store on the job's named address; every node connects to it."""
        address = f"{topo.master_addr}:{topo.store_port}"
        listener = None
        try:
            if topo.node_rank == 0:
                raw, listener = host_store(topo.master_addr, topo.store_port, cfg.store_timeout_s)
                address = f"{topo.master_addr}:{raw.port}"
            else:
                raw = connect_store(topo.master_addr, topo.store_port, cfg.store_timeout_s)
        except (RuntimeError, OSError) as err:
            raise CoordinationLost(f"cannot reach the coordination store at {address}: "
                                   f"{str(err).splitlines()[0]}") from None
        coord = cls(SealedStore(raw, sealer, on_forged), topo.node_rank, topo.nnodes, cfg, address, topo.node_name)
        coord._listener = listener
        return coord

    @property
    def port(self) -> int:
        return self.store.raw.port

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()

    # -- the wake-up key ---------------------------------------------------------------------------

    def _refresh(self) -> None:
        self._ctl = self.store.counter("ctl")

    def _publish(self, key: str, value: Any) -> None:
        """Write a key others wait for, then wake them (the order makes a reader that sees the new
        counter also see the key)."""
        self.store.set(key, value)
        self.store.counter("ctl", 1)

    def _watched(self, key: str) -> Any | None:
        """A write-once key, read only when the wake-up counter moved since it was last found missing."""
        if key in self._cache:
            return self._cache[key]
        if key in self._missed_at and self._missed_at[key] == self._ctl:
            return None
        got = self.store.get(key)
        if got is None:
            self._missed_at[key] = self._ctl
        else:
            self._cache[key] = got
        return got

    def _first_wins(self, key: str, value: dict[str, Any]) -> bool:
        won, _ = self.store.first_wins(key, {**value, **self.origin})
        if won:
            self.store.counter("ctl", 1)
        return won

    # -- the job ---------------------------------------------------------------------------------

    @_guard
    def publish_first_attempt(self, attempt: int) -> None:
        self._publish("run/first_attempt", attempt)

    @_guard
    def first_attempt(self) -> int | None:
        self._refresh()
        return self._watched("run/first_attempt")

    @_guard
    def request_stop(self, kind: StopKind, reason: str) -> bool:
        """Ask every supervisor to stop (preemption, storage); True if this was the first request."""
        return self._first_wins("stop", wire.stop_to_store(kind, reason))

    @_guard
    def stop_requested(self) -> StopRequest | None:
        self._refresh()
        got = self._watched("stop")
        return None if got is None else wire.stop_from_store(got)

    # -- an attempt --------------------------------------------------------------------------------

    @_guard
    def publish_master_port(self, attempt: int, port: int) -> None:
        self.store.set(f"a/{attempt}/master_port", port)  # written before node 0 arrives: no wake-up needed

    @_guard
    def master_port(self, attempt: int) -> int | None:
        return self.store.get(f"a/{attempt}/master_port")

    @_guard
    def arrive(self, attempt: int) -> None:
        self.store.set(f"a/{attempt}/ready/{self.node}", self.node)

    @_guard
    def barrier(self, attempt: int) -> Gate | None:
        """STOP, RESTART or GO once attempt `attempt` may (not) start; None while waiting.
        Node 0 opens the barrier when every node's sealed ready key is present and genuine."""
        self._refresh()
        if self._watched("stop") is not None:
            return Gate.STOP
        if self._watched(f"a/{attempt}/restart") is not None:
            return Gate.RESTART
        if self.node == 0 and f"a/{attempt}/go" not in self._cache:
            keys = [f"a/{attempt}/ready/{n}" for n in range(self.nnodes)]
            if self.store.all_present(keys) and self.store.get_many(keys) == list(range(self.nnodes)):
                self._publish(f"a/{attempt}/go", True)
        return Gate.GO if self._watched(f"a/{attempt}/go") else None

    @_guard
    def request_restart(self, attempt: int, **failure: Any) -> bool:
        """Post a restart request for `attempt`; True if this supervisor's failure is the one recorded."""
        return self._first_wins(f"a/{attempt}/restart", failure)

    @_guard
    def restart_requested(self, attempt: int) -> dict[str, Any] | None:
        self._refresh()
        return self._watched(f"a/{attempt}/restart")

    @_guard
    def poll(self, attempt: int) -> Gate | None:
        """The running attempt's one round trip per poll interval: STOP, RESTART or None."""
        self._refresh()
        if self._watched("stop") is not None:
            return Gate.STOP
        if self._watched(f"a/{attempt}/restart") is not None:
            return Gate.RESTART
        return None

    # -- the end of an attempt ---------------------------------------------------------------------

    @_guard
    def report(self, attempt: int, report: NodeReport) -> None:
        assert report.node == self.node, f"node {self.node} reporting for node {report.node}"
        self.store.set(f"a/{attempt}/report/{self.node}", wire.report_to_store(report))

    @_guard
    def all_reports(self, attempt: int) -> dict[int, NodeReport] | None:
        """Every node's report once all are in (node 0), else None."""
        keys = [f"a/{attempt}/report/{n}" for n in range(self.nnodes)]
        if not self.store.all_present(keys):
            return None
        got = self.store.get_many(keys)
        return None if any(r is None for r in got) else {n: wire.report_from_store(r) for n, r in enumerate(got)}

    @_guard
    def reports(self, attempt: int) -> dict[int, NodeReport]:
        """The reports that are in (after a timeout: one round trip per node)."""
        out = {}
        for n in range(self.nnodes):
            got = self.store.get(f"a/{attempt}/report/{n}")
            if got is not None:
                out[n] = wire.report_from_store(got)
        return out

    @_guard
    def publish_decision(self, attempt: int, decision: AttemptDecision) -> None:
        self._publish(f"a/{attempt}/decision", wire.decision_to_store(decision))

    @_guard
    def decision(self, attempt: int) -> AttemptDecision | None:
        self._refresh()
        got = self._watched(f"a/{attempt}/decision")
        return None if got is None else wire.decision_from_store(got)

    @_guard
    def ack(self, attempt: int) -> None:
        self.store.set(f"a/{attempt}/ack/{self.node}", self.node)

    @_guard
    def all_acked(self, attempt: int) -> bool | None:
        return True if self.store.all_present([f"a/{attempt}/ack/{n}" for n in range(self.nnodes)]) else None

    # -- status ------------------------------------------------------------------------------------

    @_guard
    def publish_status(self, summary: dict[str, Any]) -> None:
        """Publish this node's summary; an unchanged one is not sent again (a status delta)."""
        if summary != self._last_status:
            self.store.set(f"status/{self.node}", summary)
            self._last_status = summary

    @_guard
    def node_statuses(self) -> dict[int, dict[str, Any]]:
        """Every published node summary (node 0). One multi_get for the nodes seen before; only a changed
        value is opened and parsed again."""
        unseen = [n for n in range(self.nnodes) if n not in self._status_seen]
        if unseen and self.store.all_present([f"status/{n}" for n in unseen]):
            self._status_seen.update(unseen)
        elif unseen:
            for n in unseen:
                if self.store.all_present([f"status/{n}"]):
                    self._status_seen.add(n)
        nodes = sorted(self._status_seen)
        keys = [f"status/{n}" for n in nodes]
        if keys:
            self.store.ops += 1
            for n, key, blob in zip(nodes, keys, self.store.raw.multi_get(keys)):
                if n in self._status_blobs and self._status_blobs[n][0] == blob:
                    continue
                value = self.store._open(key, blob)
                if value is not None:
                    self._status_blobs[n] = (blob, value)
        return {n: self._status_blobs[n][1] for n in nodes if n in self._status_blobs}
