"""Straggler tracker: pure scoring on step times as data, and one test with real processes."""

import multiprocessing
import time

import pytest

from health.config import HealthConfig
from health.stragglers import StragglerTracker


def feed(tracker: StragglerTracker, steps: int, times: dict[int, float]) -> int | None:
    """Feed `steps` steps; return the first step after which a persistent straggler exists."""
    for step in range(1, steps + 1):
        for rank, t in times.items():
            tracker.observe(rank, t)
        if tracker.persistent():
            return step
    return None


def test_slow_rank_is_flagged_after_the_configured_windows():
    tracker = StragglerTracker(window=5, threshold=1.3, windows=3, nodes={2: "n1"})
    flagged_at = feed(tracker, 30, {0: 1.0, 1: 1.02, 2: 1.6, 3: 0.98})
    assert flagged_at == 15  # 3 windows of 5 steps
    [(rank, score, reason)] = tracker.persistent()
    assert rank == 2 and score == pytest.approx(1.6, rel=0.02)
    assert "rank 2 on node n1 is a persistent straggler" in reason and "3 windows of 5 steps" in reason
    assert tracker.scores()[0] == pytest.approx(1.0, rel=0.03)


def test_transient_slowness_is_not_persistent():
    tracker = StragglerTracker(window=4, threshold=1.3, windows=2)
    assert feed(tracker, 4, {0: 1.0, 1: 2.0, 2: 1.0}) is None  # one slow window
    assert feed(tracker, 8, {0: 1.0, 1: 1.0, 2: 1.0}) is None  # then recovered
    assert tracker.persistent() == []


def test_single_rank_has_no_stragglers():
    tracker = StragglerTracker(window=2, threshold=1.1, windows=1)
    assert feed(tracker, 10, {0: 5.0}) is None
    assert tracker.scores() == {0: 1.0}


def test_from_config_rejects_nothing_silently():
    cfg = HealthConfig(straggler_window=3, straggler_threshold=1.5, straggler_windows=2)
    t = StragglerTracker.from_config(cfg)
    assert (t.window, t.threshold, t.windows) == (3, 1.5, 2)
    with pytest.raises(ValueError):
        StragglerTracker(window=0)


def _rank(rank: int, steps: int, slow: int, queue, barrier) -> None:
    for _ in range(steps):
        t0 = time.perf_counter()
        time.sleep(0.04 if rank == slow else 0.01)  # the "compute" of one step
        queue.put((rank, time.perf_counter() - t0))  # compute time, measured before the sync point
        barrier.wait(30)  # stands in for the gradient all-reduce that keeps ranks in lockstep


def test_rank_slowed_on_purpose_is_flagged_from_real_processes():
    window, windows, steps = 4, 2, 12
    ctx = multiprocessing.get_context("forkserver")
    queue, barrier = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=_rank, args=(r, steps, 1, queue, barrier)) for r in range(3)]
    for p in procs:
        p.start()
    tracker = StragglerTracker(window=window, threshold=1.5, windows=windows)
    flagged_after = None
    seen = 0
    for seen in range(1, 3 * steps + 1):
        tracker.observe(*queue.get(timeout=30))
        if flagged_after is None and tracker.persistent():
            flagged_after = seen
    for p in procs:
        p.join(10)
    assert [rank for rank, _, _ in tracker.persistent()] == [1]
    assert flagged_after is not None and flagged_after <= 3 * window * windows + 3
    assert tracker.scores()[1] > 2.0
