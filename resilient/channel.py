"""Rank -> supervisor heartbeats over a per-node Unix datagram socket.

One JSON object per datagram. Datagrams keep message boundaries without framing, and a
full or absent receiver makes a non-blocking `sendto` fail at once, so a rank never waits
for its supervisor: the client drops the heartbeat instead.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from resilient.errors import ConfigError

SOCKET_ENV = "RESILIENT_HEARTBEAT_SOCKET"
PHASES = ("init", "restore", "step", "checkpoint", "eval", "done", "error")
MAX_DATAGRAM = 65536
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


class HeartbeatClient:
    """Sends heartbeats from a rank; `send` never blocks and never raises."""

    def __init__(self, path: str | Path, *, attempt: int, rank: int, local_rank: int) -> None:
        self._path = os.fspath(path)
        self._base = {"attempt": attempt, "rank": rank, "local_rank": local_rank, "pid": os.getpid()}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    @classmethod
    def from_env(cls) -> HeartbeatClient | None:
        """The client for this rank, or None when the process is not supervised."""
        path = os.environ.get(SOCKET_ENV)
        if not path:
            return None
        env = os.environ
        return cls(
            path,
            attempt=int(env.get("RESILIENT_ATTEMPT", 0)),
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
        )

    def send(self, phase: str, step: int, **fields: Any) -> None:
        """Report `phase` at `step` plus optional numeric/text fields; dropped if it cannot go now."""
        try:
            msg = {**fields, **self._base, "phase": phase, "step": int(step), "ts": time.time()}
            self._sock.sendto(json.dumps(msg, default=str).encode(), self._path)
        except Exception:  # noqa: BLE001 - a heartbeat must never disturb training
            pass

    def close(self) -> None:
        self._sock.close()


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

    def drain(self) -> list[dict[str, Any]]:
        """All heartbeats queued now; malformed datagrams are skipped."""
        out: list[dict[str, Any]] = []
        while True:
            try:
                raw = self._sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return out
            try:
                msg = json.loads(raw)
            except ValueError:
                continue
            if isinstance(msg, dict) and isinstance(msg.get("rank"), int) and isinstance(msg.get("step"), int):
                out.append(msg)

    def close(self) -> None:
        self._sock.close()
        self.path.unlink(missing_ok=True)
