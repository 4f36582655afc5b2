"""Node liveness as leases, judged on the reader's clock.

Every supervisor renews one sealed key (`lease/<slot>`) with an increasing sequence number every
`renew_every(lease_s)`; the coordinator reads them all in one round trip every `read_every(lease_s)`
and notes, on its own monotonic clock, when each sequence number last changed. A slot whose number has not changed for
`lease_s` is lost, whatever its ranks are doing (frozen host, kernel hang, cut link, dead supervisor).
No clocks are compared across hosts. A slot never heard from gets `join_s` (supervisors start at
different times) before it counts as lost. Pure: the caller passes the time in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


def renew_every(lease_s: float) -> float:
    """Renewal period: four renewals per lease, so one late or lost renewal never expires a live node."""
    return lease_s / 4


def read_every(lease_s: float) -> float:
    """How often the coordinator reads every lease and judges them: twice per renewal, so a renewal is seen
    at most this late and an expiry is noticed at most this late (detection <= lease_s + 2 x this)."""
    return lease_s / 8


def lease_expired(last_change: float, now: float, lease_s: float) -> tuple[bool, str]:
    silent = now - last_change
    if silent > lease_s:
        return True, f"lease not renewed for {silent:.1f}s (node_lease_s {lease_s:g})"
    return False, f"renewed {silent:.1f}s ago"


@dataclass
class _Seen:
    seq: int | None
    since: float
    value: Mapping[str, Any]


class LeaseTable:
    """The coordinator's view of every slot's lease."""

    def __init__(self, slots: Iterable[int], lease_s: float, join_s: float, now: float) -> None:
        self.lease_s, self.join_s = lease_s, join_s
        self._seen = {s: _Seen(None, now, {}) for s in slots}

    def observe(self, slot: int, value: Mapping[str, Any] | None, now: float) -> None:
        """A read of `lease/<slot>` at `now` (None: absent)."""
        seen = self._seen.setdefault(slot, _Seen(None, now, {}))
        if value is None:
            return
        seq = int(value.get("seq", -1))
        if seq != seen.seq:
            seen.seq, seen.since, seen.value = seq, now, value
        else:
            seen.value = value

    def value(self, slot: int) -> Mapping[str, Any]:
        """The slot's newest lease value ({} before its first)."""
        return self._seen[slot].value if slot in self._seen else {}

    def state(self, slot: int, now: float) -> tuple[bool, str]:
        """(lost, why) for one slot."""
        seen = self._seen[slot]
        if seen.seq is None:
            if now - seen.since > self.join_s:
                return True, f"no lease within {self.join_s:g}s of the start"
            return False, "not heard from yet"
        return lease_expired(seen.since, now, self.lease_s)

    def lost(self, slots: Iterable[int], now: float) -> dict[int, str]:
        """The slots among `slots` whose lease expired, with why."""
        out = {}
        for s in slots:
            expired, why = self.state(s, now)
            if expired:
                out[s] = why
        return out
