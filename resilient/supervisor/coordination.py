"""Cross-node coordination of the supervisors through the store of the current coordinator.

The real supervisor (daemon.py) and the scale simulator (bench/scale/simulate.py) both drive this
class, so the bench measures the code that runs in production. Values are typed records (reports.py,
decisions.py, roster.py), encoded for the store in wire.py, sealed (auth.py); the store admits only
this job's supervisors (store.py). Every call has a deadline: a coordinator that does not answer is
lost (CoordinationLost), and the survivors elect another (failover.py).

Keys (`S` a slot, `K` a node rank, `A` an attempt):
  run/first_attempt            attempt number of this job's first attempt
  roster                       the coordinator's newest roster (who runs which node rank, the spares, who is out)
  stop                         first stop request {kind, reason, node, pid, host}; never cleared
  lease/S                      slot S's lease {seq, pid, host, role, unhealthy}, renewed by its liveness thread
  join/S                       (a new coordinator's store) slot S joined the election with its view of the run
  a/A/plan                     the roster attempt A runs with (published before anyone spawns)
  a/A/master_port              rank 0's process-group port for attempt A (node rank 0's supervisor)
  a/A/ready/K                  node rank K is ready to spawn attempt A
  a/A/go                       the coordinator saw every node rank ready: the attempt's barrier is open
  a/A/restart                  first restart request of attempt A {kind, rank, step, reason, node, pid, host}
  a/A/report/K                 node rank K's account of how attempt A ended
  a/A/decision                 the coordinator's verdict for attempt A: restart (with backoff) or stop
  a/A/ack/S                    slot S read the final decision (the coordinator keeps the store up until all did)
  status/S                     slot S's latest status summary (the coordinator merges them into status.json)
"""

from __future__ import annotations

import enum
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from resilient.core.errors import ResilientError
from resilient.core.exit_codes import ExitCode
from resilient.core.kvstore import StoreClient, StoreLimits, StoreRefused, StoreServer, host_store
from resilient.supervisor import roster as rosters
from resilient.supervisor import wire
from resilient.supervisor.auth import Forged, Sealer
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.decisions import AttemptDecision
from resilient.supervisor.reports import NodeReport, StopKind, StopRequest
from resilient.supervisor.roster import Roster
from resilient.supervisor.store import SealedStore
from resilient.supervisor.topology import Topology

T = TypeVar("T")


class Gate(enum.Enum):
    """What a node waiting at an attempt's barrier, or watching a running attempt, is told."""

    GO = "go"
    """Every node is ready: spawn the ranks."""
    STOP = "stop"
    """A stop was requested: save and stop."""
    RESTART = "restart"
    """A node posted a failure: tear down for the next attempt."""


class CoordinationLost(ResilientError):
    """The coordinator's store does not answer (its supervisor is frozen, cut off or gone)."""

    exit_code = ExitCode.COORDINATOR_LOST


@dataclass(frozen=True)
class Intervals:
    poll_s: float
    """Store poll of a running attempt (one round trip)."""
    wait_s: float
    """Store poll while waiting at a barrier or for a decision."""
    leader_wait_s: float
    """The coordinator's poll while it waits for every node (one round trip whatever the node count)."""
    status_s: float
    """Each node's status publication."""
    merge_s: float
    """The coordinator's merge of every node's status into status.json (its CPU grows with the node count)."""
    reason: str


# Merging 1024 node summaries every second took ~20% of a core on node 0 in bench/scale (opening, parsing,
# writing 8192 ranks); at most 512 a second bounds that share whatever the node count.
_MERGED_NODES_PER_S = 512


def intervals(nnodes: int, cfg: SupervisorConfig) -> Intervals:
    """Per-node store poll and status intervals that keep the store within `cfg.store_ops_budget`:
    at steady state half of it for the polls (one round trip each), a quarter for status writes and
    the rest for leases; the waits of a restart (a second or so) poll up to 4x faster within the same half."""
    poll = max(cfg.poll_interval_s, nnodes / (0.5 * cfg.store_ops_budget))
    wait = max(cfg.poll_interval_s / 4, nnodes / (0.5 * cfg.store_ops_budget))
    status = max(cfg.status_interval_s, nnodes / (0.25 * cfg.store_ops_budget))
    merge = max(status, nnodes / _MERGED_NODES_PER_S)
    load = nnodes / poll + nnodes / status + nnodes * 4 / cfg.node_lease_s
    return Intervals(
        poll,
        wait,
        cfg.poll_interval_s / 4,
        status,
        merge,
        f"{nnodes} node(s) poll every {poll:.3g}s (waits: {wait:.3g}s), publish status every "
        f"{status:.3g}s and renew leases every {cfg.node_lease_s / 4:.3g}s: ~{load:.0f} store ops/s "
        f"of the {cfg.store_ops_budget:g} budget; status.json every {merge:.3g}s",
    )


@dataclass(frozen=True)
class Access:
    """What a supervisor needs to host or reach any epoch's store: where the slots are, the store's
    settings, the job's key, and what to do with a value that fails authentication or a refused write."""

    topo: Topology
    cfg: SupervisorConfig
    sealer: Sealer
    on_forged: Callable[[str, str], None]
    """Called with (key, reason) for a store value that fails authentication (it is ignored)."""
    on_limit: Callable[[str], None] | None = None
    """Called when the hosted store refuses a write at one of its bounds."""


def limits(slots: int, cfg: SupervisorConfig) -> StoreLimits:
    return StoreLimits(max_keys=cfg.store_max_keys, max_bytes=cfg.store_max_bytes, max_clients=4 * slots + 16)


def _stop_or_restart(stop: Any, restart: Any) -> Gate | None:
    """A stop request outranks a restart request: a job asked to stop saves and stops."""
    if stop is not None:
        return Gate.STOP
    return Gate.RESTART if restart is not None else None


def _guard(fn):
    def wrapped(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (OSError, Forged) as err:  # StoreUnavailable is an OSError
            raise CoordinationLost(f"coordination store at {self.address} lost: {str(err).splitlines()[0]}") from None
        except StoreRefused as err:
            raise CoordinationLost(f"coordination store at {self.address} refused a write: {err}") from None

    return wrapped


class Coordinator:
    def __init__(
        self,
        store: SealedStore,
        slot: int,
        slots: int,
        cfg: SupervisorConfig,
        address: str,
        host: str | None = None,
        server: StoreServer | None = None,
    ) -> None:
        self.store, self.slot, self.slots, self.address, self.server = store, slot, slots, address, server
        self.intervals = intervals(slots, cfg)
        self.wait_s = self.intervals.leader_wait_s if server is not None else self.intervals.wait_s
        self.origin = {"node": slot, "pid": os.getpid(), "host": host or socket.gethostname()}
        self._cache: dict[str, Any] = {}
        self._status_blobs: dict[int, tuple[bytes, dict[str, Any]]] = {}
        self._last_status: dict[str, Any] | None = None

    @classmethod
    def open(
        cls, access: Access, *, coordinator: int = 0, epoch: int = 0, connect_timeout_s: float | None = None
    ) -> Coordinator:
        """The store of `epoch`: slot `coordinator` hosts it on its named address; every slot connects."""
        topo, cfg = access.topo, access.cfg
        addr, port = topo.store_address(coordinator, epoch)
        server = None
        try:
            if topo.slot == coordinator:
                server = host_store(addr, port, access.sealer.store_key, limits(topo.slots, cfg), access.on_limit)
                port = server.port
            client = StoreClient(
                addr,
                port,
                access.sealer.store_key,
                op_timeout_s=cfg.node_lease_s,
                connect_timeout_s=cfg.store_timeout_s if connect_timeout_s is None else connect_timeout_s,
            )
        except OSError as err:
            if server is not None:
                server.close()
            raise CoordinationLost(
                f"cannot reach the coordination store at {addr}:{port}: {str(err).splitlines()[0]}"
            ) from None
        store = SealedStore(client, access.sealer, access.on_forged)
        return cls(store, topo.slot, topo.slots, cfg, f"{addr}:{port}", topo.node_name, server)

    def second_connection(self, access: Access) -> SealedStore:
        """Another connection to this store (the lease thread's: it must not wait behind the main loop's calls).
        This store answered a moment ago: its connect may take up to three leases (a whole allocation
        connects to a new coordinator at once after an election); no answer by then is a lost coordinator."""
        addr, port = self.address.rsplit(":", 1)
        lease_s = access.cfg.node_lease_s
        try:
            client = StoreClient(
                addr, int(port), access.sealer.store_key, connect_timeout_s=3 * lease_s, op_timeout_s=lease_s
            )
        except OSError as err:
            raise CoordinationLost(f"cannot reach the coordination store at {self.address}: {err}") from None
        return SealedStore(client, access.sealer, access.on_forged)

    @property
    def hosting(self) -> bool:
        return self.server is not None

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def close(self) -> None:
        self.store.raw.close()
        if self.server is not None:
            self.server.close()

    # -- helpers -------------------------------------------------------------------------------------

    def _publish(self, key: str, value: Any) -> None:
        self.store.set(key, value)

    def _watched(self, keys: Sequence[str]) -> list[Any | None]:
        """Write-once keys in one round trip; a key found once is never read again."""
        missing = [k for k in keys if k not in self._cache]
        if missing:
            for k, v in zip(missing, self.store.get_many(missing), strict=True):
                if v is not None:
                    self._cache[k] = v
        return [self._cache.get(k) for k in keys]

    def _written(self, attempt: int, name: str, decode: Callable[[Any], T]) -> T | None:
        """Write-once key `name` of `attempt`, decoded, once it is there."""
        got = self._watched([f"a/{attempt}/{name}"])[0]
        return None if got is None else decode(got)

    def _first_wins(self, key: str, value: dict[str, Any]) -> bool:
        won, _ = self.store.first_wins(key, {**value, **self.origin})
        return won

    # -- the job ---------------------------------------------------------------------------------

    @_guard
    def publish_first_attempt(self, attempt: int) -> None:
        self._publish("run/first_attempt", attempt)

    @_guard
    def first_attempt(self) -> int | None:
        return self._watched(["run/first_attempt"])[0]

    @_guard
    def request_stop(self, kind: StopKind, reason: str) -> bool:
        """Ask every supervisor to stop (preemption, storage); True if this was the first request."""
        return self._first_wins("stop", wire.stop_to_store(kind, reason))

    @_guard
    def stop_requested(self) -> StopRequest | None:
        got = self._watched(["stop"])[0]
        return None if got is None else wire.stop_from_store(got)

    def stop_record(self) -> dict[str, Any] | None:
        """The stop request as sealed in the store (what a supervisor carries into an election)."""
        return self._cache.get("stop")

    def adopt_stop(self, record: dict[str, Any]) -> None:
        """A new coordinator keeps the stop a joiner had seen (first request wins, as before)."""
        self.store.first_wins("stop", record)

    @_guard
    def publish_roster(self, roster: Roster) -> None:
        self._publish("roster", rosters.to_store(roster))

    @_guard
    def roster(self) -> Roster | None:
        got = self.store.get("roster")
        return None if got is None else rosters.from_store(got)

    # -- an attempt --------------------------------------------------------------------------------

    @_guard
    def publish_plan(self, attempt: int, roster: Roster) -> None:
        self._publish(f"a/{attempt}/plan", rosters.to_store(roster))

    @_guard
    def plan(self, attempt: int) -> Roster | None:
        """The roster attempt `attempt` runs with, once the coordinator published it."""
        return self._written(attempt, "plan", rosters.from_store)

    @_guard
    def publish_master_port(self, attempt: int, port: int) -> None:
        self.store.set(f"a/{attempt}/master_port", port)  # written before its node arrives at the barrier

    @_guard
    def master_port(self, attempt: int) -> int | None:
        return self._written(attempt, "master_port", int)

    @_guard
    def arrive(self, attempt: int, node_rank: int) -> None:
        self.store.set(f"a/{attempt}/ready/{node_rank}", self.slot)

    @_guard
    def barrier(self, attempt: int, plan: Roster) -> Gate | None:
        """STOP, RESTART or GO once attempt `attempt` may (not) start; None while waiting. The
        coordinator opens it when every node rank's ready key holds the slot the plan gives it."""
        stop, restart, go = self._watched(["stop", f"a/{attempt}/restart", f"a/{attempt}/go"])
        if (ended := _stop_or_restart(stop, restart)) is not None:
            return ended
        if go is None and self.hosting:
            keys = [f"a/{attempt}/ready/{k}" for k in range(len(plan.nodes))]
            if self.store.all_present(keys) and self.store.get_many(keys) == list(plan.nodes):
                self._publish(f"a/{attempt}/go", True)
                go = self._watched([f"a/{attempt}/go"])[0]
        return Gate.GO if go else None

    @_guard
    def request_restart(self, attempt: int, **failure: Any) -> bool:
        """Post a restart request for `attempt`; True if this supervisor's failure is the one recorded."""
        return self._first_wins(f"a/{attempt}/restart", failure)

    @_guard
    def restart_requested(self, attempt: int) -> dict[str, Any] | None:
        return self._written(attempt, "restart", dict)

    @_guard
    def poll(self, attempt: int) -> Gate | None:
        """The running attempt's one round trip per poll interval: STOP, RESTART or None."""
        return _stop_or_restart(*self._watched(["stop", f"a/{attempt}/restart"]))

    # -- the end of an attempt ---------------------------------------------------------------------

    @_guard
    def report(self, attempt: int, report: NodeReport) -> None:
        self.store.set(f"a/{attempt}/report/{report.node}", wire.report_to_store(report))

    @_guard
    def reports(self, attempt: int, plan: Roster, node_ranks: Iterable[int]) -> dict[int, NodeReport]:
        """The reports of `node_ranks` that are in, in one round trip; a report from a slot that does not
        run that node rank in `plan` (a replaced node that woke up) is not its report."""
        ranks = list(node_ranks)
        got = self.store.get_many([f"a/{attempt}/report/{k}" for k in ranks])
        out = {}
        for k, value in zip(ranks, got, strict=True):
            if value is not None:
                report = wire.report_from_store(value)
                if report.slot in (None, plan.nodes[k]):
                    out[k] = report
        return out

    @_guard
    def publish_decision(self, attempt: int, decision: AttemptDecision) -> None:
        self._publish(f"a/{attempt}/decision", wire.decision_to_store(decision))

    @_guard
    def decision(self, attempt: int) -> AttemptDecision | None:
        return self._written(attempt, "decision", wire.decision_from_store)

    @_guard
    def ack(self, attempt: int) -> None:
        self.store.set(f"a/{attempt}/ack/{self.slot}", self.slot)

    @_guard
    def all_acked(self, attempt: int, slots: Iterable[int]) -> bool | None:
        return True if self.store.all_present([f"a/{attempt}/ack/{s}" for s in slots]) else None

    @_guard
    def forget(self, attempt: int) -> None:
        """Drop an old attempt's keys (the coordinator, two attempts later): keys stay bounded."""
        self.store.delete_prefix(f"a/{attempt}/")

    # -- election ------------------------------------------------------------------------------------

    @_guard
    def join(self, record: dict[str, Any]) -> None:
        self.store.set(f"join/{self.slot}", record)

    @_guard
    def joins(self, slots: Iterable[int]) -> dict[int, dict[str, Any]]:
        keys = [f"join/{s}" for s in slots]
        return {
            int(k.rsplit("/", 1)[1]): v for k, v in zip(keys, self.store.get_many(keys), strict=True) if v is not None
        }

    # -- status ------------------------------------------------------------------------------------

    @_guard
    def publish_status(self, summary: dict[str, Any]) -> None:
        """Publish this slot's summary; an unchanged one is not sent again (a status delta)."""
        if summary != self._last_status:
            self.store.set(f"status/{self.slot}", summary)
            self._last_status = summary

    @_guard
    def node_statuses(self, slots: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
        """Every published slot summary (the coordinator), in one round trip; only a changed value is opened
        and parsed again."""
        wanted = list(range(self.slots) if slots is None else slots)
        keys = [f"status/{s}" for s in wanted]
        self.store.ops += 1
        for s, key, blob in zip(wanted, keys, self.store.raw.multi_get(keys), strict=True):
            if blob is None or (s in self._status_blobs and self._status_blobs[s][0] == blob):
                continue
            value = self.store._open(key, blob)
            if value is not None:
                self._status_blobs[s] = (blob, value)
        return {s: self._status_blobs[s][1] for s in wanted if s in self._status_blobs}
