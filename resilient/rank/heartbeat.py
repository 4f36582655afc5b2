"""Rank -> supervisor heartbeats over a per-node Unix datagram socket.

One JSON object per datagram. Datagrams keep message boundaries without framing, and a full or
absent receiver makes a non-blocking `sendto` fail at once, so a rank never waits for its
supervisor: the client drops the heartbeat instead. Every field a heartbeat may carry is declared
in `Heartbeat`; the supervisor, the metrics exporter and the straggler tracker read these names.
"""

from __future__ import annotations

import json
import os
import socket
import time
from enum import StrEnum
from pathlib import Path
from typing import Any, TypedDict, Unpack

from resilient.core.errors import ConfigError
from resilient.rank.env import RankEnv

MAX_DATAGRAM = 65536
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


class Phase(StrEnum):
    """What a rank is doing; each phase has its own hang timeout in the supervisor."""

    INIT = "init"
    """Process start, imports, process groups."""
    BUILD = "build"
    """Building the model, the optimizer and the data pipeline (minutes at scale)."""
    RESTORE = "restore"
    """Loading a checkpoint."""
    STEP = "step"
    """Training; the step number must advance within the step timeout."""
    CHECKPOINT = "checkpoint"
    """Saving (blocking part)."""
    EVAL = "eval"
    """Validation."""
    FINALIZE = "finalize"
    """Waiting for checkpoint writes in flight to finish (end of run or stop): a whole write, not only
    the blocking part a save costs the loop."""
    DONE = "done"
    """Finished its work and about to exit."""
    ERROR = "error"
    """A fatal error; `message` says which."""


class Fields(TypedDict, total=False):
    """Optional heartbeat fields a rank may send (numbers unless noted)."""

    loss: float
    val_loss: float
    lr: float
    grad_norm: float
    step_time: float
    """Wall seconds of the last step."""
    compute_time: float
    """Seconds of the last step before its gradient reduction (tells stragglers apart)."""
    tokens: int
    """Tokens consumed so far."""
    tokens_per_s: float
    mfu: float
    consumed_samples: int
    ckpt_step: int
    """The step being (or just) saved."""
    ckpt_blocking_s: float
    """Seconds the loop was blocked by the last save."""
    ckpt_total_s: float
    """Seconds from the start of the last save to its commit."""
    ckpt_bytes: int
    """Bytes of the last committed checkpoint."""
    ckpt_intervals: dict[str, int]
    """Steps between saves of each checkpoint tier ("disk", ...), as the loop uses them now."""
    message: str
    """Error text (phase `error`)."""
    exit_code: int
    """The code the rank is about to exit with (phase `error`): CONFIG_ERROR and CHECKPOINT_DAMAGED end
    the run at once instead of a restart."""


class Heartbeat(Fields):
    """One decoded heartbeat: identity, phase and step, plus any `Fields`."""

    attempt: int
    rank: int
    local_rank: int
    pid: int
    phase: str
    step: int
    ts: float


FIELD_NAMES = frozenset(Fields.__annotations__)


class HeartbeatClient:
    """Sends heartbeats from a supervised rank; `send` never blocks and never fails on I/O."""

    def __init__(self, env: RankEnv) -> None:
        assert env.heartbeat_socket is not None
        self._path = os.fspath(env.heartbeat_socket)
        self._base = {"attempt": env.attempt, "rank": env.rank, "local_rank": env.local_rank, "pid": os.getpid()}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def send(self, phase: Phase, step: int, **fields: Unpack[Fields]) -> None:
        """Report `phase` at `step` plus optional `Fields`; dropped if it cannot go now."""
        unknown = fields.keys() - FIELD_NAMES
        if unknown:  # a programming error, not a runtime condition
            raise TypeError(f"unknown heartbeat fields: {sorted(unknown)}")
        try:
            msg = {**fields, **self._base, "phase": str(phase), "step": int(step), "ts": time.time()}
            self._sock.sendto(json.dumps(msg, default=str).encode(), self._path)
        except Exception:  # noqa: BLE001 - a heartbeat must never disturb training
            pass

    def close(self) -> None:
        self._sock.close()


class NullHeartbeat:
    """The client of an unsupervised process: same API, sends nothing."""

    def send(self, phase: Phase, step: int, **fields: Unpack[Fields]) -> None:
        pass

    def close(self) -> None:
        pass


def connect(env: RankEnv | None = None) -> HeartbeatClient | NullHeartbeat:
    """The heartbeat client for this process: real when supervised, null otherwise."""
    env = env or RankEnv.from_environ()
    return HeartbeatClient(env) if env.supervised else NullHeartbeat()


class HeartbeatServer:
    """The supervisor's end: a bound datagram socket (0600) in a 0700 directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if len(os.fsencode(self.path)) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"heartbeat socket path {self.path} is longer than {_MAX_SOCKET_PATH} bytes; "
                "use a shorter run directory"
            )
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        self.path.unlink(missing_ok=True)  # left behind by a supervisor that was killed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(os.fspath(self.path))
        os.chmod(self.path, 0o600)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list[Heartbeat]:
        """All heartbeats queued now; malformed datagrams are skipped."""
        out: list[Heartbeat] = []
        while True:
            try:
                raw = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return out
            beat = decode(raw)
            if beat is not None:
                out.append(beat)

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)


def decode(raw: bytes) -> Heartbeat | None:
    """A heartbeat from its wire form, or None if it is not one."""
    try:
        msg: Any = json.loads(raw)
    except ValueError:
        return None
    if isinstance(msg, dict) and isinstance(msg.get("rank"), int) and isinstance(msg.get("step"), int):
        return msg  # type: ignore[return-value]
    return None
