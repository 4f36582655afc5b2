"""Hang timeouts as pure functions: calibrated step and checkpoint timeouts, phases, blame, done."""

import pytest

from resilient.rank.heartbeat import Heartbeat
from resilient.supervisor import timeouts as t
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.tracking import HeartbeatTracker, RankView

CFG = SupervisorConfig(
    step_timeout_initial_s=100,
    step_timeout_floor_s=10,
    step_timeout_factor=4,
    step_timeout_min_samples=3,
    step_timeout_window=5,
    init_timeout_s=50,
    restore_timeout_s=60,
    checkpoint_timeout_s=70,
    eval_timeout_s=80,
)


def test_step_timeout_uses_initial_value_until_enough_samples():
    timeout, reason = t.calibrated_step_timeout([1.0, 1.0], CFG)
    assert timeout == 100 and "2/3" in reason


def test_step_timeout_scales_slowest_recent_step():
    timeout, reason = t.calibrated_step_timeout([9.0, 3.0, 4.0, 5.0], CFG)
    assert timeout == 36.0 and "4 x slowest" in reason


def test_step_timeout_only_looks_at_the_window():
    # 20 s fell out of the 5-sample window
    assert t.calibrated_step_timeout([20.0, 3.0, 3.0, 3.0, 3.0, 3.0], CFG)[0] == 12.0


def test_step_timeout_never_below_floor():
    timeout, reason = t.calibrated_step_timeout([0.1, 0.2, 0.1], CFG)
    assert timeout == 10 and "floor" in reason


@pytest.mark.parametrize(
    "phase,expected", [("init", 50), ("restore", 60), ("checkpoint", 70), ("done", 70), ("eval", 80), ("step", 7.5)]
)
def test_phase_selects_its_timeout(phase, expected):
    assert t.phase_timeout(phase, 7.5, CFG)[0] == expected


def test_hang_declared_only_after_the_phase_timeout():
    hung, reason = t.is_hung("step", 100.0, 112.0, t.phase_timeout("step", 12.5, CFG))
    assert not hung and "within step timeout" in reason
    hung, reason = t.is_hung("step", 100.0, 113.0, t.phase_timeout("step", 12.5, CFG))
    assert hung and "13.0s" in reason and "step timeout 12.5s" in reason


def test_restore_phase_is_not_judged_by_the_short_step_timeout():
    assert not t.is_hung("restore", 0.0, 59.0, t.phase_timeout("restore", 1.0, CFG))[0]
    assert t.is_hung("restore", 0.0, 61.0, t.phase_timeout("restore", 1.0, CFG))[0]


def test_blame_hang_prefers_the_stopped_process_then_the_lowest_step_then_the_oldest():
    # rank 0 was SIGSTOPped; rank 1 waits in its all-reduce and looks just as stale
    assert t.blame_hang([(1, 6, 100.0, "sleeping"), (0, 6, 100.2, "stopped")])[0] == 0
    assert t.blame_hang([(0, 7, 100.0, "sleeping"), (1, 6, 101.0, "sleeping")])[0] == 1
    assert t.blame_hang([(0, 6, 101.0, "sleeping"), (1, 6, 100.0, "running")])[0] == 1
    rank, reason = t.blame_hang([(3, 6, 100.0, "sleeping")])
    assert rank == 3 and "only rank" in reason


def test_checkpoint_timeout_calibrates_from_observed_saves():
    cfg = SupervisorConfig(checkpoint_timeout_s=900, step_timeout_floor_s=6, step_timeout_factor=3)
    assert t.calibrated_checkpoint_timeout([], cfg)[0] == 900
    assert t.calibrated_checkpoint_timeout([0.2, 0.5], cfg)[0] == 6  # the floor
    assert t.calibrated_checkpoint_timeout([40.0], cfg)[0] == 120
    assert t.calibrated_checkpoint_timeout([400.0], cfg)[0] == 900  # never beyond the configured limit
    assert t.is_hung("checkpoint", 100.0, 107.0, t.phase_timeout("checkpoint", 1.0, cfg, 6.0))[0]
    assert not t.is_hung("checkpoint", 100.0, 107.0, t.phase_timeout("checkpoint", 1.0, cfg))[0]


def test_all_done_counts_ranks_lingering_after_done():
    assert t.all_done([("done", None), ("step", 0)])
    assert not t.all_done([("done", None), ("step", None)])
    assert not t.all_done([("done", None), ("done", 3)])


def test_a_ranks_first_step_of_an_attempt_keeps_the_initial_step_timeout():
    # lazy communicator setup, data-loader workers and compilation fall in the first step: a 4 s calibrated
    # timeout from steady-state steps declared a 5 s first step after a restart hung
    assert t.phase_timeout("step", 12.0, CFG, first_step=True)[0] == 100
    assert t.phase_timeout("step", 400.0, CFG, first_step=True)[0] == 400  # never shorter than the calibrated one
    assert not t.is_hung("step", 100.0, 150.0, t.phase_timeout("step", 12.0, CFG, first_step=True))[0]
    hung, reason = t.is_hung("step", 100.0, 201.0, t.phase_timeout("step", 12.0, CFG, first_step=True))
    assert hung and "first step's timeout 100s" in reason
    assert t.is_hung("checkpoint", 100.0, 171.0, t.phase_timeout("checkpoint", 12.0, CFG, first_step=True))[
        0
    ]  # other phases keep theirs


def test_the_tracker_knows_when_a_ranks_first_step_is_under_way():
    tracker = HeartbeatTracker(window=4)
    tracker.track([RankView(rank=0, local_rank=0, pid=1, last_progress=0.0)])
    view = tracker.views[0]

    def beat(phase: str, step: int) -> bool:
        hb = Heartbeat(attempt=2, rank=0, local_rank=0, pid=1, phase=phase, step=step, ts=0.0)
        assert tracker.observe(hb, attempt=2, now=1.0)
        return view.in_first_step

    assert [beat("init", 0), beat("restore", 0), beat("step", 9)] == [False, False, True]  # resumed at 9
    assert [beat("step", 10), beat("checkpoint", 12), beat("step", 12), beat("eval", 12)] == [False] * 4
    assert beat("step", 8)  # rolled back to 8: the loader and the first step start over
    assert not beat("step", 9)
