"""Where this supervisor sits in the job: node rank, node count, store address, node name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from resilient.rank.env import node_name
from resilient.core.errors import ConfigError


@dataclass(frozen=True)
class Topology:
    node_rank: int
    nnodes: int
    master_addr: str
    """Host of node 0: its supervisor hosts the coordination store, its first rank the process group."""
    store_port: int
    node_name: str


def first_host(nodelist: str) -> str:
    """First host of a Slurm hostlist, e.g. 'gpu[007-012,20],cpu1' -> 'gpu007'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    # Each bracket group contributes its first element, padding kept ('[007-012]' -> '007').
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first)
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"cannot read the first host of SLURM_JOB_NODELIST={nodelist!r}")
    return host


def resolve_topology(env: Mapping[str, str], *, node_rank: int | None, nnodes: int | None,
                     master_addr: str | None, master_port: int | None, default_port: int) -> Topology:
    """Flags win; otherwise Slurm's environment; otherwise a single node on this machine."""
    def slurm_int(key: str) -> int | None:
        raw = env.get(key)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not an integer") from None

    rank = node_rank if node_rank is not None else slurm_int("SLURM_NODEID") or 0
    count = nnodes if nnodes is not None else slurm_int("SLURM_NNODES") or 1
    if count < 1 or not 0 <= rank < count:
        raise ConfigError(f"node rank {rank} is not within {count} node(s)")
    addr = master_addr
    if addr is None and env.get("SLURM_JOB_NODELIST"):
        addr = first_host(env["SLURM_JOB_NODELIST"])
    if addr is None:
        if count > 1:
            raise ConfigError("--master-addr is required for several nodes outside Slurm")
        addr = "127.0.0.1"
    port = master_port if master_port is not None else default_port
    if not 0 <= port <= 65535 or (port == 0 and count > 1):
        raise ConfigError(f"store port {port} is not usable for {count} node(s)")
    return Topology(rank, count, addr, port, node_name(env))
