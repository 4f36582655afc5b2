"""Signals to the supervisor, as something its loops can wait on.

A handler only notes the signal's name; `signal.set_wakeup_fd` makes the signal readable on a socket, so a
loop blocked in `select` (ranks' pidfds, heartbeats, a store poll) wakes at once instead of at its next poll.
"""

from __future__ import annotations

import selectors
import signal
import socket
from collections.abc import Iterable
from types import FrameType


class Wakeups:
    def __init__(self, signals: Iterable[signal.Signals]) -> None:
        self.reader, self._writer = socket.socketpair()  # the writer stays open while the wakeup fd is set
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        self.received: str | None = None
        """The name of the newest stop signal received, if any."""
        for sig in set(signals):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def drain(self) -> None:
        """Empty the socket (every select on it would return at once otherwise)."""
        try:
            while self.reader.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def wait(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, less if a signal arrives."""
        with selectors.DefaultSelector() as sel:
            sel.register(self.reader, selectors.EVENT_READ)
            sel.select(max(0.0, timeout_s))
        self.drain()
