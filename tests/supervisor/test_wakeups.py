"""Signals to the supervisor wake its loops: a real signal, delivered to this process."""

from __future__ import annotations

import os
import selectors
import signal

import pytest

from resilient.supervisor.wakeups import Wakeups


@pytest.fixture
def restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    signal.set_wakeup_fd(-1)
    for s, handler in before.items():
        signal.signal(s, handler)


def test_a_signal_is_named_and_wakes_a_select_on_the_reader(restored):
    wakeups = Wakeups([signal.SIGUSR1, signal.SIGUSR2])
    assert wakeups.received is None
    os.kill(os.getpid(), signal.SIGUSR2)
    with selectors.DefaultSelector() as sel:
        sel.register(wakeups.reader, selectors.EVENT_READ)
        assert sel.select(60)  # readable: the wakeup fd carried the signal
    assert wakeups.received == "SIGUSR2"
    wakeups.drain()
    with selectors.DefaultSelector() as sel:
        sel.register(wakeups.reader, selectors.EVENT_READ)
        assert sel.select(0) == []  # drained: the next wait sleeps
    os.kill(os.getpid(), signal.SIGUSR1)
    wakeups.wait(60)
    assert wakeups.received == "SIGUSR1"
    with pytest.raises(BlockingIOError):
        wakeups.reader.recv(1)  # wait() drained what woke it
