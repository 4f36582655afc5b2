"""Who does what in the allocation: the roster, and its changes as pure functions.

The allocation has `slots` supervisors, one per Slurm node (slot = index in the job's node list). The
training topology has `len(nodes)` node ranks; node rank k runs on slot `nodes[k]`. The other live
slots are spares, taken in order; a slot that failed is out for the rest of the allocation (never
taken back). A spare taking node rank k takes k's place in the topology (same ranks, same TP/PP/DP
placement, same place in the memory tier's ring), so nothing about the global batch changes.

The coordinator is the lowest live slot when it was elected (election.py); its store listens on
`hosts[coordinator]`:`store_port + epoch`. Every change makes a new version; the coordinator publishes
it and the supervisors keep the newest they have seen (an election starts from the newest any
majority member has).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any


class Role(enum.StrEnum):
    NODE = "node"
    """Hosts a node rank's ranks."""
    SPARE = "spare"
    """Keeps warm standby ranks and runs health checks; takes a node rank when one fails."""
    OUT = "out"
    """Failed (unhealthy, lost, fenced): never used again in this allocation."""


@dataclass(frozen=True)
class Roster:
    version: int
    epoch: int
    """The coordinator's generation: 0 at the start, +1 per election."""
    coordinator: int
    """The slot whose supervisor hosts the store and decides."""
    nodes: tuple[int, ...]
    """Node rank k -> the slot that runs it."""
    spares: tuple[int, ...]
    """Slots on standby, in the order they are taken."""
    out: tuple[tuple[int, str], ...] = ()
    """Slots out of the run, with why, in the order they went out."""
    hosts: tuple[str, ...] = field(default=(), compare=False)
    """Slot -> host (Slurm node name); where a coordinator's store and a node rank's ranks are reached."""
    pids: tuple[int | None, ...] = field(default=(), compare=False)
    """Slot -> its supervisor's pid, as its lease last said (what a fence kills)."""
    names: tuple[str | None, ...] = field(default=(), compare=False)
    """Slot -> its node's name as its lease last said (what the ledger, status and a requeue name)."""

    @property
    def slots(self) -> int:
        return len(self.nodes) + len(self.spares) + len(self.out)

    @property
    def members(self) -> tuple[int, ...]:
        """Slots still in the run (nodes and spares), ascending."""
        return tuple(sorted((*self.nodes, *self.spares)))

    def role(self, slot: int) -> Role:
        if slot in self.nodes:
            return Role.NODE
        if slot in self.spares:
            return Role.SPARE
        return Role.OUT

    def node_rank(self, slot: int) -> int | None:
        return self.nodes.index(slot) if slot in self.nodes else None

    def why_out(self, slot: int) -> str | None:
        return dict(self.out).get(slot)

    def host(self, slot: int) -> str:
        return self.hosts[slot] if slot < len(self.hosts) else f"slot{slot}"

    def pid(self, slot: int) -> int | None:
        return self.pids[slot] if slot < len(self.pids) else None

    def name(self, slot: int) -> str:
        """The node's name (Slurm's), else its host."""
        return (self.names[slot] if slot < len(self.names) else None) or self.host(slot)


def with_identities(roster: Roster, pids: Mapping[int, int | None], names: Mapping[int, str | None]) -> Roster:
    """The roster with the supervisors' pids and node names the coordinator knows (unknown ones kept)."""
    return replace(
        roster,
        pids=tuple(pids.get(s) or roster.pid(s) for s in range(roster.slots)),
        names=tuple(names.get(s) or (roster.names[s] if s < len(roster.names) else None) for s in range(roster.slots)),
    )


def initial(nodes: int, slots: int, hosts: Sequence[str] = ()) -> Roster:
    """Slots 0..nodes-1 run node ranks 0..nodes-1, the rest are spares; slot 0 coordinates."""
    if not 1 <= nodes <= slots:
        raise ValueError(f"{nodes} node(s) do not fit in an allocation of {slots}")
    return Roster(0, 0, 0, tuple(range(nodes)), tuple(range(nodes, slots)), (), tuple(hosts))


@dataclass(frozen=True)
class Replacement:
    node_rank: int
    failed_slot: int
    spare_slot: int
    reason: str


def replace_nodes(roster: Roster, faulty: Mapping[int, str]) -> tuple[Roster, tuple[Replacement, ...], str]:
    """Each faulty node rank (-> why) gets the next spare, in node-rank order; its slot goes out.
    Raises ValueError when the spares do not cover every fault (the caller checked `len(spares)`)."""
    if len(faulty) > len(roster.spares):
        raise ValueError(f"{len(faulty)} faulty node(s) but {len(roster.spares)} spare(s)")
    nodes, spares, out, done = list(roster.nodes), list(roster.spares), list(roster.out), []
    for rank in sorted(faulty):
        spare = spares.pop(0)
        done.append(Replacement(rank, nodes[rank], spare, faulty[rank]))
        out.append((nodes[rank], faulty[rank]))
        nodes[rank] = spare
    new = replace(roster, version=roster.version + 1, nodes=tuple(nodes), spares=tuple(spares), out=tuple(out))
    why = "; ".join(
        f"node {r.node_rank}: {roster.name(r.spare_slot)} (slot {r.spare_slot}) replaces "
        f"{roster.name(r.failed_slot)} (slot {r.failed_slot}): {r.reason}"
        for r in done
    )
    return new, tuple(done), why


def drop_spares(roster: Roster, gone: Mapping[int, str]) -> Roster:
    """Spares that failed (unhealthy, lost) go out; other slots in `gone` are left to `replace_nodes`."""
    dropped = {s: why for s, why in gone.items() if s in roster.spares}
    if not dropped:
        return roster
    return replace(
        roster,
        version=roster.version + 1,
        spares=tuple(s for s in roster.spares if s not in dropped),
        out=(*roster.out, *dropped.items()),
    )


def take_over(roster: Roster, slot: int, lost: int, reason: str) -> Roster:
    """The roster of a new coordinator `slot` after an election: a new epoch; the lost coordinator goes out
    if it was a spare (a node rank it ran is replaced by the next decision, like any lost node)."""
    new = replace(roster, version=roster.version + 1, epoch=roster.epoch + 1, coordinator=slot)
    return drop_spares(new, {lost: reason}) if lost in roster.spares else new


def to_store(r: Roster) -> dict[str, Any]:
    return {
        "version": r.version,
        "epoch": r.epoch,
        "coordinator": r.coordinator,
        "nodes": list(r.nodes),
        "spares": list(r.spares),
        "out": [[s, why] for s, why in r.out],
        "hosts": list(r.hosts),
        "pids": list(r.pids),
        "names": list(r.names),
    }


def from_store(v: Mapping[str, Any]) -> Roster:
    return Roster(
        int(v["version"]),
        int(v["epoch"]),
        int(v["coordinator"]),
        tuple(int(s) for s in v["nodes"]),
        tuple(int(s) for s in v["spares"]),
        tuple((int(s), str(why)) for s, why in v["out"]),
        tuple(str(h) for h in v["hosts"]),
        tuple(None if p is None else int(p) for p in v.get("pids", ())),
        tuple(None if n is None else str(n) for n in v.get("names", ())),
    )
