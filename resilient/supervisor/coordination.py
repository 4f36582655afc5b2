"""Cross-node coordination of the supervisors through a torch.distributed TCPStore on node 0.

Keys (values are JSON):
  run/first_attempt            attempt number of this job's first attempt (set by node 0)
  stop                         first stop request {kind, node, reason} (preemption); never cleared
  a/{A}/master_port            rank 0's process-group port for attempt A (node 0)
  a/{A}/ready                  counter: supervisors ready to spawn attempt A (the barrier)
  a/{A}/restart                first restart request of attempt A {node, rank, kind, reason}
  a/{A}/report/{N}             node N's account of how attempt A ended on it
  a/{A}/decision               node 0's verdict for attempt A: restart (with backoff) or stop (exit code)
  a/{A}/ack                    counter: supervisors that read the final decision (node 0 waits before exiting)
  status/{N}                   node N's latest status summary (node 0 merges them into status.json)
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from resilient.core.errors import ResilientError
from resilient.core.exit_codes import ExitCode
from resilient.supervisor.topology import Topology


class CoordinationLost(ResilientError):
    """The store on node 0 cannot be reached (its supervisor is gone)."""

    exit_code = ExitCode.RANK_FAILED


def _guard(fn):
    def wrapped(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except (RuntimeError, OSError) as err:  # DistStoreError / DistNetworkError subclass RuntimeError
            raise CoordinationLost(f"coordination store at {self.address} lost: {str(err).splitlines()[0]}") from None
    return wrapped


class Coordinator:
    def __init__(self, topo: Topology, timeout_s: float) -> None:
        self.address = f"{topo.master_addr}:{topo.store_port}"
        try:
            self._store = dist.TCPStore(
                topo.master_addr, topo.store_port, is_master=topo.node_rank == 0,
                timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
            )
        except (RuntimeError, OSError) as err:
            raise CoordinationLost(f"cannot reach the coordination store at {self.address}: "
                                   f"{str(err).splitlines()[0]}") from None
        self.port = self._store.port
        self.node = topo.node_rank

    def _get(self, key: str) -> Any | None:
        if not self._store.check([key]):
            return None
        return json.loads(self._store.get(key))

    def _first_wins(self, key: str, value: dict[str, Any]) -> bool:
        mine = json.dumps(value, sort_keys=True)
        return self._store.compare_set(key, "", mine).decode() == mine

    @_guard
    def publish_first_attempt(self, attempt: int) -> None:
        self._store.set("run/first_attempt", json.dumps(attempt))

    @_guard
    def first_attempt(self) -> int | None:
        return self._get("run/first_attempt")

    @_guard
    def request_stop(self, kind: str, reason: str) -> bool:
        """Ask every supervisor to stop (preemption); True if this was the first request."""
        return self._first_wins("stop", {"kind": kind, "node": self.node, "reason": reason})

    @_guard
    def stop_requested(self) -> dict[str, Any] | None:
        return self._get("stop")

    @_guard
    def publish_master_port(self, attempt: int, port: int) -> None:
        self._store.set(f"a/{attempt}/master_port", json.dumps(port))

    @_guard
    def master_port(self, attempt: int) -> int | None:
        return self._get(f"a/{attempt}/master_port")

    @_guard
    def arrive(self, attempt: int) -> None:
        self._store.add(f"a/{attempt}/ready", 1)

    @_guard
    def arrived(self, attempt: int) -> int:
        return self._store.add(f"a/{attempt}/ready", 0)

    @_guard
    def request_restart(self, attempt: int, **failure: Any) -> bool:
        """Post a restart request for `attempt`; True if this supervisor's failure is the one recorded."""
        return self._first_wins(f"a/{attempt}/restart", {"node": self.node, **failure})

    @_guard
    def restart_requested(self, attempt: int) -> dict[str, Any] | None:
        return self._get(f"a/{attempt}/restart")

    @_guard
    def report(self, attempt: int, report: dict[str, Any]) -> None:
        self._store.set(f"a/{attempt}/report/{self.node}", json.dumps(report))

    @_guard
    def reports(self, attempt: int, nnodes: int) -> dict[int, dict[str, Any]]:
        out = {}
        for n in range(nnodes):
            got = self._get(f"a/{attempt}/report/{n}")
            if got is not None:
                out[n] = got
        return out

    @_guard
    def publish_decision(self, attempt: int, decision: dict[str, Any]) -> None:
        self._store.set(f"a/{attempt}/decision", json.dumps(decision))

    @_guard
    def decision(self, attempt: int) -> dict[str, Any] | None:
        return self._get(f"a/{attempt}/decision")

    @_guard
    def ack(self, attempt: int) -> None:
        self._store.add(f"a/{attempt}/ack", 1)

    @_guard
    def acks(self, attempt: int) -> int:
        return self._store.add(f"a/{attempt}/ack", 0)

    @_guard
    def publish_status(self, summary: dict[str, Any]) -> None:
        self._store.set(f"status/{self.node}", json.dumps(summary))

    @_guard
    def node_statuses(self, nnodes: int) -> dict[int, dict[str, Any]]:
        return {n: s for n in range(nnodes) if (s := self._get(f"status/{n}")) is not None}
