"""Status publishing: each slot's view goes to the coordination store; the coordinator merges them into status.json."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resilient.core import ledger
from resilient.core.events import LedgerEvent
from resilient.status import write_status
from resilient.supervisor.ranks import RankProcess
from resilient.supervisor.reports import StopRequest
from resilient.supervisor.roster import Role, Roster
from resilient.supervisor.topology import Topology
from resilient.supervisor.tracking import RankView


def rank_rows(
    ranks: Sequence[RankProcess], views: Mapping[int, RankView], topo: Topology, node: int | None, wall: float
) -> list[dict[str, Any]]:
    """One status row per local rank (pid, phase, step, heartbeat age, exit code); `node`: the node rank."""
    rows = []
    for r in ranks:
        v = views[r.spec.rank]
        age = None if v.last_heartbeat is None else wall - v.last_heartbeat
        rows.append(
            {
                "rank": v.rank,
                "local_rank": v.local_rank,
                "node": node,
                "node_name": topo.node_name,
                "pid": v.pid,
                "phase": v.phase,
                "step": v.step,
                "last_heartbeat": v.last_heartbeat,
                "heartbeat_age_s": age,
                "exit_code": r.returncode,
            }
        )
    return rows


def node_status(
    topo: Topology,
    state: str,
    rows: list[dict[str, Any]],
    metrics_port: int | None,
    spares: dict[str, int] | None = None,
    *,
    node: int | None = None,
    role: str = "node",
    unhealthy: str | None = None,
) -> dict[str, Any]:
    """What one slot publishes to the store; `spares`: {"count", "warm" (imports done), "rss_bytes"} of its
    standby ranks; `role`: node, spare or out; `unhealthy`: a spare's fatal verdict on itself."""
    return {
        "node": node,
        "slot": topo.slot,
        "node_name": topo.node_name,
        "role": role,
        "state": str(state),
        "ranks": rows,
        "metrics_port": metrics_port,
        "supervisor_pid": os.getpid(),
        "spares": spares,
        "unhealthy": unhealthy,
    }


def bad_nodes(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The run's bad-node ledger by host: how often each was taken out, the last time, kind and reason."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("event") == LedgerEvent.BAD_NODE and r.get("node"):
            seen = out.setdefault(str(r["node"]), {"count": 0})
            seen.update(
                count=seen["count"] + 1,
                last_ts=r.get("ts"),
                kind=r.get("kind"),
                reason=r.get("reason"),
                replaced_by=r.get("replaced_by"),
            )
    return out


def write_run_status(
    run_dir: Path,
    nodes: Mapping[int, dict[str, Any]],
    *,
    state: str,
    attempt: int,
    reached_step: int | None,
    restarts: int,
    last_failure: dict[str, Any] | None,
    stop: StopRequest | None = None,
    roster: Roster | None = None,
    lost: Mapping[int, str] | None = None,
) -> None:
    """The coordinator: merge every slot's published status into RUN_DIR/status.json (`stop`: who asked,
    from where, why; `roster`: which host runs which node rank, the spares, who is out; `lost`: slots whose
    lease expired)."""
    live = {s: n for s, n in nodes.items() if roster is None or roster.role(s) is not Role.OUT}
    ranks = sorted((r for s in live.values() for r in s["ranks"]), key=lambda r: r["rank"])
    steps = [r["step"] for r in ranks if r["step"] is not None]
    events = list(ledger.read(run_dir))  # read once: saves, snapshots and the bad nodes all come from it
    saves = [e["step"] for e in events if e.get("event") == LedgerEvent.CKPT_SAVE]
    snapshots = [e["step"] for e in events if e.get("event") == LedgerEvent.MEM_SNAPSHOT]
    members = None
    if roster is not None:
        members = {
            "epoch": roster.epoch,
            "coordinator": roster.name(roster.coordinator),
            "nodes": [roster.name(s) for s in roster.nodes],
            "spares": [roster.name(s) for s in roster.spares],
            "out": {roster.name(s): why for s, why in roster.out},
            "lost": {roster.name(s): why for s, why in (lost or {}).items()},
        }
    write_status(
        run_dir,
        {
            "state": str(state),
            "attempt": attempt,
            "step": max(steps, default=reached_step),
            "last_checkpoint": saves[-1] if saves else None,
            "last_memory_snapshot": snapshots[-1] if snapshots else None,
            "restarts": restarts,
            "last_failure": last_failure,
            "stop": None if stop is None else dataclasses.asdict(stop),
            "nodes": {str(s["node"] if s.get("node") is not None else f"slot{n}"): s["state"] for n, s in live.items()},
            "metrics_ports": {s["node_name"]: s["metrics_port"] for s in nodes.values()},
            "ranks": ranks,
            "spares": {s["node_name"]: s.get("spares") for s in live.values()},
            "roster": members,
            "bad_nodes": bad_nodes(events),
        },
    )


class Throttle:
    """At most one publication per interval, unless forced (every state change publishes at once)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s, self._next = interval_s, 0.0

    def force(self) -> None:
        self._next = 0.0

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.interval_s
        return True
