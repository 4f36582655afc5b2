"""Where this supervisor sits in the job: node rank, node count, store address, node name."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from resilient.core.errors import ConfigError
from resilient.rank.env import node_name


@dataclass(frozen=True)
class Topology:
    """Where this supervisor sits in the allocation. Which node rank it runs (if any) is the roster's
    business (roster.py): it changes when a spare takes a failed node's place."""

    slot: int
    """This supervisor's place in the allocation (Slurm: SLURM_NODEID)."""
    slots: int
    """Supervisors in the allocation: the training nodes plus the spare nodes."""
    hosts: tuple[str, ...]
    """Slot -> host: where its supervisor's store (when it coordinates) and its ranks are reached."""
    store_port: int
    """The coordination store's port at epoch 0; after the k-th election, `store_port + k`."""
    node_name: str
    instance: str = field(default_factory=lambda: secrets.token_hex(8))
    """This job instance, the same on every node and new on every requeue: sealed store values are bound
    to it, so a value recorded in an earlier job cannot be replayed into this one."""

    def __post_init__(self) -> None:
        if len(self.hosts) != self.slots or not 0 <= self.slot < self.slots:
            raise ValueError(f"slot {self.slot} of {self.slots} with hosts {self.hosts}")

    def store_address(self, coordinator: int, epoch: int) -> tuple[str, int]:
        """Where the store of `epoch` listens, hosted by slot `coordinator`."""
        return self.hosts[coordinator], self.store_port + epoch if self.store_port else 0


def local(node_name: str, instance: str | None = None) -> Topology:
    """One supervisor on this machine (`resilient run`)."""
    return Topology(0, 1, ("127.0.0.1",), 0, node_name, instance or f"local:{secrets.token_hex(8)}")


def job_instance(env: Mapping[str, str], nnodes: int) -> str:
    """Slurm's job id and restart count; one machine: a fresh random id (no other node must agree);
    several nodes outside Slurm: RESILIENT_JOB_INSTANCE, which the launcher must set the same everywhere."""
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_RESTART_COUNT', '0')}"
    if env.get("RESILIENT_JOB_INSTANCE"):
        return f"env:{env['RESILIENT_JOB_INSTANCE']}"
    if nnodes == 1:
        return f"local:{secrets.token_hex(8)}"
    raise ConfigError(
        "RESILIENT_JOB_INSTANCE must be set (the same on every node, new per job) for several nodes outside Slurm"
    )


def expand_hostlist(nodelist: str) -> list[str]:
    """Every host of a Slurm hostlist, in order: 'gpu[007-009,20],cpu1' -> gpu007 gpu008 gpu009 gpu20 cpu1."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            if nodelist[start:i].strip():
                parts.append(nodelist[start:i].strip())
            start = i + 1
    hosts: list[str] = []
    for part in parts:
        names = [""]
        for text, group in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", part):
            expanded = []
            for item in group.split(",") if group else [""]:
                lo, dash, hi = item.partition("-")
                if dash and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi):
                    expanded += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
                elif item == "" or (item.isdigit() and not dash):
                    expanded.append(item)
                else:
                    raise ConfigError(f"cannot read the host list SLURM_JOB_NODELIST={nodelist!r}")
            names = [n + text + e for n in names for e in expanded]
        hosts += [n for n in names if n]
    if not hosts or any("[" in h or "]" in h for h in hosts):
        raise ConfigError(f"cannot read the host list SLURM_JOB_NODELIST={nodelist!r}")
    return hosts


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist, e.g. 'gpu[007-012,20],cpu1' -> 'gpu007'."""
    return expand_hostlist(nodelist)[0]


def resolve_topology(
    env: Mapping[str, str],
    *,
    node_rank: int | None,
    nnodes: int | None,
    master_addr: str | None,
    master_port: int | None,
    default_port: int,
    hosts: list[str] | None = None,
) -> Topology:
    """Flags win; otherwise Slurm's environment; otherwise a single node on this machine. `node_rank` and
    `nnodes` are the slot and the allocation's size (nodes + spare nodes); without `hosts` or Slurm's
    node list every slot is at `master_addr` (supervisors of one machine)."""

    def slurm_int(key: str) -> int | None:
        raw = env.get(key)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not an integer") from None

    slot = node_rank if node_rank is not None else slurm_int("SLURM_NODEID") or 0
    count = nnodes if nnodes is not None else slurm_int("SLURM_NNODES") or 1
    if count < 1 or not 0 <= slot < count:
        raise ConfigError(f"node rank {slot} is not within {count} node(s)")
    if hosts is None and master_addr is None and env.get("SLURM_JOB_NODELIST"):
        hosts = expand_hostlist(env["SLURM_JOB_NODELIST"])
    if hosts is None:
        if master_addr is None and count > 1:
            raise ConfigError("--master-addr or --hosts is required for several nodes outside Slurm")
        hosts = [master_addr or "127.0.0.1"] * count
    if len(hosts) != count:
        raise ConfigError(f"{len(hosts)} host(s) ({','.join(hosts)}) for {count} node(s)")
    port = master_port if master_port is not None else default_port
    if not 0 <= port <= 65535 or (port == 0 and count > 1):
        raise ConfigError(f"store port {port} is not usable for {count} node(s)")
    return Topology(slot, count, tuple(hosts), port, node_name(env), job_instance(env, count))
