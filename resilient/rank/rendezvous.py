"""The ranks' rendezvous store (MASTER_ADDR:MASTER_PORT) with the coordination store's protection.

torch's TCPStore answers anyone who reaches the port: a stray or hostile client can read the process
group's keys, overwrite them, or block a rank's call. Under a supervisor, rank 0 instead hosts an
authenticated key-value store (resilient.core.kvstore) bound to MASTER_ADDR, and every rank proves a key
derived from the run's secret (RUN_DIR/.secret) for this attempt and port: a client without the secret
reads and writes nothing, and a rank of another attempt cannot join. `KVStore` is the c10d Store the
process group and megatron's groups use on top of it.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch.distributed as dist

from resilient.core import kvstore
from resilient.core.secret import derive, read
from resilient.rank.env import RankEnv

_WAIT_POLL_S = 0.005
_KEEP: list[object] = []
"""The stores torch holds: their Python side must outlive every process group that uses them."""


def rendezvous_key(env: RankEnv) -> bytes | None:
    """This attempt's rendezvous key, or None when the rank is not supervised (no run dir)."""
    if env.run_dir is None or env.supervisor_pid is None:
        return None
    return derive(read(env.run_dir), f"rank rendezvous\0{env.attempt}\0{env.master_port}")


class KVStore(dist.Store):
    """A c10d Store on the authenticated key-value store (c10d's blocking `get`/`wait` poll `check`)."""

    def __init__(self, client: kvstore.StoreClient, key: bytes, timeout: timedelta) -> None:
        super().__init__()
        self._client, self._key, self._timeout = client, key, timeout
        _KEEP.append(self)

    def set(self, key: str, value: bytes | str) -> None:
        self._client.set(key, value if isinstance(value, bytes) else str(value).encode())

    def get(self, key: str) -> bytes:
        self.wait([key])
        got = self._client.multi_get([key])[0]
        if got is None:
            raise RuntimeError(f"rendezvous key {key!r} vanished")
        return got

    def check(self, keys: list[str]) -> bool:
        return self._client.check(keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        limit = (timeout or self._timeout).total_seconds()
        deadline = time.monotonic() + limit
        while not self._client.check(keys):
            if time.monotonic() > deadline:
                raise RuntimeError(f"rendezvous: keys {keys} not set within {limit:g}s")
            time.sleep(_WAIT_POLL_S)

    def add(self, key: str, value: int) -> int:
        while True:  # one writer wins each round: compare-and-set on the decimal value, as TCPStore keeps it
            held = self._client.multi_get([key])[0]
            new = str(int(held or b"0") + value).encode()
            if self._client.compare_set(key, held or b"", new) == new:
                return int(new)

    def compare_set(self, key: str, expected: bytes | str, desired: bytes | str) -> bytes:
        as_bytes = [v if isinstance(v, bytes) else str(v).encode() for v in (expected, desired)]
        return self._client.compare_set(key, *as_bytes)

    def deleteKey(self, key: str) -> bool:  # noqa: N802 - c10d's trampoline looks up the C++ name
        return self._client.delete(key)

    delete_key = deleteKey

    def getNumKeys(self) -> int:  # noqa: N802 - c10d's trampoline looks up the C++ name
        return self._client.count()

    num_keys = getNumKeys

    def clone(self) -> KVStore:
        """A store on a connection of its own (torch uses one per process group)."""
        c = self._client
        return KVStore(
            kvstore.StoreClient(
                c.addr, c.port, self._key, connect_timeout_s=self._timeout.total_seconds(), op_timeout_s=c.op_timeout_s
            ),
            self._key,
            self._timeout,
        )

    def set_timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    @property
    def timeout(self) -> timedelta:
        return self._timeout


def rendezvous_store(env: RankEnv, key: bytes, timeout_s: float) -> KVStore:
    """Rank 0 hosts the store on MASTER_ADDR:MASTER_PORT (for the life of the process); every rank connects."""
    if env.rank == 0:
        _KEEP.append(kvstore.host_store(env.master_addr, env.master_port, key))
    # A frozen rank 0 is found by the collectives' own timeout; calls to the store get the same deadline.
    client = kvstore.StoreClient(
        env.master_addr, env.master_port, key, connect_timeout_s=timeout_s, op_timeout_s=timeout_s
    )
    return KVStore(client, key, timedelta(seconds=timeout_s))
