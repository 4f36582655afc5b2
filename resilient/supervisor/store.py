"""Typed, sealed access to the coordination store (the store itself: resilient.core.kvstore)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from resilient.core.kvstore import StoreClient
from resilient.supervisor.auth import Forged, Sealer


class SealedStore:
    """Typed, sealed access through one client; counts its round trips (the bench's store load)."""

    def __init__(self, client: StoreClient, sealer: Sealer, on_forged: Callable[[str, str], None]) -> None:
        self.raw = client
        self._sealer = sealer
        self._on_forged = on_forged
        self.ops = 0

    def _open(self, key: str, blob: bytes | None) -> Any | None:
        if blob is None:
            return None
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
        return self.get_many([key])[0]

    def all_present(self, keys: Sequence[str]) -> bool:
        self.ops += 1
        return self.raw.check(list(keys))

    def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """Values of `keys` in one round trip (None where absent or forged)."""
        if not keys:
            return []
        self.ops += 1
        return [self._open(k, blob) for k, blob in zip(keys, self.raw.multi_get(list(keys)), strict=True)]

    def first_wins(self, key: str, value: Any) -> tuple[bool, Any]:
        """Set `key` unless it holds a value already; (won, the value recorded)."""
        mine = self._sealer.seal(key, value)
        self.ops += 1
        held = self.raw.compare_set(key, b"", mine)
        if held == mine:
            return True, value
        genuine = self._open(key, held)
        if genuine is None:  # only this job's supervisors write: a value that does not open is a bug
            raise Forged(f"{key}: holds a value that does not open under this run's secret")
        return False, genuine

    def delete_prefix(self, prefix: str) -> int:
        self.ops += 1
        return self.raw.delete_prefix(prefix)
