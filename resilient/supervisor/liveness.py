"""This supervisor's lease, renewed on a thread and a store connection of its own (the main loop may be
busy stopping ranks for seconds; a lease must not expire for that). On the coordinator the same thread
reads every slot's lease into the LeaseTable (leases.py) in one round trip, twice per renewal.

A renewal the store does not answer within `node_lease_s` means the coordinator is lost: the thread
records why and stops; the main loop turns that into CoordinationLost (and an election).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from resilient.core.kvstore import StoreRefused
from resilient.supervisor.leases import LeaseTable, read_every, renew_every
from resilient.supervisor.store import SealedStore


def lease_key(slot: int) -> str:
    return f"lease/{slot}"


class Liveness:
    def __init__(
        self,
        store: SealedStore,
        slot: int,
        slots: int,
        lease_s: float,
        *,
        read_all: bool,
        join_s: float,
        value: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.slot, self.slots, self.lease_s = store, slot, slots, lease_s
        self._value, self._clock, self._read_all = value, clock, read_all
        self.table = LeaseTable(range(slots), lease_s, join_s, clock()) if read_all else None
        self.failed: str | None = None
        """Why renewing stopped working (the coordinator is lost), once it did."""
        self._seq = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{slot}", daemon=True)

    def start(self) -> Liveness:
        self._renew()  # the first lease is in the store before the caller goes on
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (an election replaces this object); does not wait for a renewal stuck on a dead store."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=0.1)
        try:
            self.store.raw.close()
        except OSError:
            pass

    def _run(self) -> None:
        period = read_every(self.lease_s) if self._read_all else renew_every(self.lease_s)
        per_renewal = round(renew_every(self.lease_s) / period)
        tick = 0
        while not self._stop.wait(period):
            tick += 1
            self._renew(write=tick % per_renewal == 0)
            if self.failed is not None:
                return

    def _renew(self, write: bool = True) -> None:
        """Renew this slot's lease (`write`) and, on the coordinator, read every lease."""
        try:
            if write:
                self._seq += 1
                self.store.set(lease_key(self.slot), {"seq": self._seq, "pid": os.getpid(), **self._value()})
            if self._read_all:
                slots = list(range(self.slots))
                values = self.store.get_many([lease_key(s) for s in slots])
                now = self._clock()
                with self._lock:
                    assert self.table is not None
                    for s, v in zip(slots, values, strict=True):
                        self.table.observe(s, v, now)
        except (OSError, StoreRefused) as err:  # StoreUnavailable is an OSError
            if not self._stop.is_set():
                self.failed = f"lease renewal failed: {str(err).splitlines()[0]}"

    def lost(self, slots: Iterable[int], now: float | None = None) -> dict[int, str]:
        """Among `slots`, those whose lease expired (the coordinator's table), with why."""
        if self.table is None:
            return {}
        with self._lock:
            return self.table.lost(slots, self._clock() if now is None else now)

    def value_of(self, slot: int) -> dict[str, Any]:
        """A slot's newest lease value (the coordinator's table)."""
        if self.table is None:
            return {}
        with self._lock:
            return dict(self.table.value(slot))
