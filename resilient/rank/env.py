"""The rank environment: who a rank is, written by the supervisor and read by the rank, in one type.

torchrun-compatible (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
MASTER_PORT) so any torch.distributed script runs under the supervisor unchanged, plus RESILIENT_*
for what only a protocol-aware rank uses (heartbeat socket, attempt, stop signals, run directory, the
run's failure history).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

HEARTBEAT_SOCKET = "RESILIENT_HEARTBEAT_SOCKET"
SUPERVISOR_PID = "RESILIENT_SUPERVISOR_PID"
RUN_DIR = "RESILIENT_RUN_DIR"
ATTEMPT = "RESILIENT_ATTEMPT"
NODE_RANK = "RESILIENT_NODE_RANK"
NODE_NAME = "RESILIENT_NODE_NAME"
STOP_SIGNALS = "RESILIENT_STOP_SIGNALS"
DEFAULT_STOP_SIGNALS = ("SIGUSR1", "SIGTERM")
FAILURES = "RESILIENT_FAILURES"
EXPOSURE_S = "RESILIENT_EXPOSURE_S"
ALLOW_SHARED_DIR = "RESILIENT_ALLOW_SHARED_DIR"
ASSIGNED_AT = "RESILIENT_ASSIGNED_AT"
"""Set by a parked spare (resilient.rank.park) when it takes a rank: Unix time the rank began."""
PARK_READY_FD = "RESILIENT_PARK_READY_FD"
"""A parked spare's inherited pipe: it writes one byte there once its imports are done (the supervisor
then counts it warm) and closes it."""


def assigned_at(env: Mapping[str, str] = os.environ) -> float | None:
    """When this process became a rank, if it was a parked spare (its own start time is then earlier, by
    however long it was parked); None for a rank started as a new process."""
    value = env.get(ASSIGNED_AT)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def node_name(env: Mapping[str, str] = os.environ) -> str:
    """This node's name as the health checks, metrics and ledger label it."""
    return env.get(NODE_NAME) or env.get("SLURMD_NODENAME") or socket.gethostname()


@dataclass(frozen=True)
class FailureHistory:
    """The run's failures so far and the time it has been supervised, as the supervisor knows them when
    it starts the rank (the trainer's adaptive checkpoint interval estimates the failure rate from it)."""

    failures: int = 0
    """Failures of the run, across attempts and requeues (a repeat at the same step counts once)."""
    exposure_s: float = 0.0
    """Wall seconds the run has been supervised (the longest any node has)."""


@dataclass(frozen=True)
class RankEnv:
    """One rank's identity in one attempt; `to_environ` and `from_environ` are each other's inverse."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    node_name: str = field(default_factory=node_name)
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    attempt: int = 0
    run_dir: Path | None = None
    """The run directory the supervisor assigned (None: unsupervised, the rank's own config decides)."""
    heartbeat_socket: Path | None = None
    """The supervisor's heartbeat socket (None: unsupervised, heartbeats go nowhere)."""
    supervisor_pid: int | None = None
    """The supervisor that spawned this rank: the rank dies with it."""
    stop_signals: tuple[str, ...] = DEFAULT_STOP_SIGNALS
    """Signals that ask the rank to save and stop at the next step boundary."""
    history: FailureHistory = FailureHistory()
    """The run's failure history when the rank was started (empty: unsupervised, or none yet)."""
    allow_shared_dir: bool = False
    """The operator allowed run and checkpoint directories whose path others own or can write
    (`supervisor.allow_shared_dir`); otherwise the rank refuses them too."""

    @property
    def supervised(self) -> bool:
        return self.heartbeat_socket is not None

    def to_environ(self) -> dict[str, str]:
        """The variables the supervisor sets for the rank process."""
        env = {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            ATTEMPT: str(self.attempt),
            NODE_RANK: str(self.node_rank),
            NODE_NAME: self.node_name,
            STOP_SIGNALS: ",".join(self.stop_signals),
            FAILURES: str(self.history.failures),
            EXPOSURE_S: repr(self.history.exposure_s),
            **({ALLOW_SHARED_DIR: "1"} if self.allow_shared_dir else {}),
        }
        optional = {RUN_DIR: self.run_dir, HEARTBEAT_SOCKET: self.heartbeat_socket, SUPERVISOR_PID: self.supervisor_pid}
        env.update({k: str(v) for k, v in optional.items() if v is not None})
        return env

    @classmethod
    def from_environ(cls, env: Mapping[str, str] = os.environ) -> RankEnv:
        """This process's identity; torchrun's variables suffice, missing ones take single-process defaults."""
        world = int(env.get("WORLD_SIZE", "1"))
        optional_path = lambda key: Path(env[key]) if env.get(key) else None  # noqa: E731
        return cls(
            rank=int(env.get("RANK", "0")),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
            node_rank=int(env.get(NODE_RANK, env.get("GROUP_RANK", "0"))),
            node_name=node_name(env),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            attempt=int(env.get(ATTEMPT, "0")),
            run_dir=optional_path(RUN_DIR),
            heartbeat_socket=optional_path(HEARTBEAT_SOCKET),
            supervisor_pid=int(env[SUPERVISOR_PID]) if env.get(SUPERVISOR_PID) else None,
            stop_signals=tuple(s for s in env.get(STOP_SIGNALS, ",".join(DEFAULT_STOP_SIGNALS)).split(",") if s),
            history=FailureHistory(int(env.get(FAILURES, "0")), float(env.get(EXPOSURE_S, "0.0"))),
            allow_shared_dir=env.get(ALLOW_SHARED_DIR) == "1",
        )
