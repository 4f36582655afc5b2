"""The coordination store: a c10d TCPStore bound to one named address, read and written through seals.

torch's TCPStore server listens on every interface; handing it a socket we bound ourselves
(`master_listen_fd`, libuv backend) keeps it on the address the job names (127.0.0.1 on one machine).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from resilient.supervisor.auth import Forged, Sealer

_BACKLOG = 4096  # every supervisor of a 1024-node job connects at once


def bound_listener(addr: str, port: int) -> socket.socket:
    """A listening TCP socket on `addr`:`port` only (port 0: the kernel picks)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def host_store(addr: str, port: int, timeout_s: float) -> tuple[dist.TCPStore, socket.socket]:
    """The store's server (plus its own client) listening on `addr` only; keep the socket alive with it."""
    sock = bound_listener(addr, port)
    store = dist.TCPStore(addr, sock.getsockname()[1], is_master=True, timeout=timedelta(seconds=timeout_s),
                          wait_for_workers=False, master_listen_fd=sock.fileno(), use_libuv=True)
    return store, sock


def connect_store(addr: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))


class SealedStore:
    """Typed, sealed access to a TCPStore; counts its round trips (the bench's store load)."""

    def __init__(self, store: dist.TCPStore, sealer: Sealer, on_forged: Callable[[str, str], None]) -> None:
        self.raw = store
        self._sealer = sealer
        self._on_forged = on_forged
        self.ops = 0

    def _open(self, key: str, blob: bytes) -> Any | None:
        try:
            return self._sealer.open(key, blob)
        except Forged as err:
            self._on_forged(key, str(err))
            return None

    def set(self, key: str, value: Any) -> None:
        self.ops += 1
        self.raw.set(key, self._sealer.seal(key, value))

    def get(self, key: str) -> Any | None:
        """The value at `key`, or None when absent or forged (reported)."""
        self.ops += 1
        if not self.raw.check([key]):
            return None
        self.ops += 1
        return self._open(key, self.raw.get(key))

    def all_present(self, keys: Sequence[str]) -> bool:
        self.ops += 1
        return self.raw.check(list(keys))

    def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """Values of keys known to exist, in one round trip (None where forged)."""
        if not keys:
            return []
        self.ops += 1
        return [self._open(k, blob) for k, blob in zip(keys, self.raw.multi_get(list(keys)))]

    def first_wins(self, key: str, value: Any) -> tuple[bool, Any]:
        """Set `key` unless it holds a genuine value; (won, the value recorded). A forged squatter is
        replaced, so a client without the secret cannot block a stop or restart by taking the key first."""
        mine = self._sealer.seal(key, value)
        expected = b""
        for _ in range(3):
            self.ops += 1
            held = self.raw.compare_set(key, expected, mine)
            if held == mine:
                return True, value
            genuine = self._open(key, held)
            if genuine is not None:
                return False, genuine
            expected = held  # forged: swap it out
        raise Forged(f"{key}: kept being overwritten with forged values")

    def counter(self, key: str, delta: int = 0) -> int:
        """An unsealed counter: only ever a wake-up hint, never trusted for a decision."""
        self.ops += 1
        return self.raw.add(key, delta)
