"""The supervisor's persisted calibration: failure history, supervised time, step/save times survive a restart."""

from __future__ import annotations

import json
import stat

import torch

from resilient.core.rundir import RunDir
from resilient.rank.env import FailureHistory, RankEnv
from resilient.supervisor.calibration import Calibration, CalibrationStore, failure_history, parse, signature
from resilient.supervisor.tracking import HeartbeatTracker
from trainer.checkpoint.adaptive import AdaptiveInterval
from trainer.checkpoint.config import CheckpointConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_new_supervisor_starts_from_what_the_last_one_learned(tmp_path):
    clock = Clock()
    first = HeartbeatTracker(window=4)
    store = CalibrationStore(tmp_path, 1, first, "sig", clock)
    store.begin(attempt=0)
    first.step_times.extend([0.5, 0.6, 0.7, 0.8, 0.9])  # the window keeps the newest 4
    first.ckpt_times.append(1.5)
    clock.now += 30
    store.on_failure({"kind": "crash", "step": 12, "rank": 1, "reason": "x"}, attempt=0)
    clock.now += 20
    store.close()

    path = RunDir(tmp_path).calibration_file(1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    second = HeartbeatTracker(window=4)
    again = CalibrationStore(tmp_path, 1, second, "sig", clock)
    assert list(second.step_times) == [0.6, 0.7, 0.8, 0.9] and list(second.ckpt_times) == [1.5]
    assert not again.died_before
    again.begin(attempt=1)
    clock.now += 10
    again.write()
    saved = json.loads(path.read_text())
    assert saved["exposure_s"] == 60.0 and saved["open"] is True
    assert [(f["kind"], f["step"], f["attempt"]) for f in saved["failures"]] == [("crash", 12, 0)]


def test_a_supervisor_that_died_counts_as_a_failure(tmp_path):
    clock = Clock()
    # begun, then SIGKILLed: never closed
    CalibrationStore(tmp_path, 0, HeartbeatTracker(window=4), "sig", clock).begin(attempt=3)
    after = CalibrationStore(tmp_path, 0, HeartbeatTracker(window=4), "sig", clock)
    assert after.died_before
    after.begin(attempt=4)
    after.close()
    saved = json.loads(RunDir(tmp_path).calibration_file(0).read_text())
    assert [(f["kind"], f["attempt"]) for f in saved["failures"]] == [("supervisor_lost", 4)]
    assert saved["open"] is False


def test_periodic_writes_are_throttled(tmp_path):
    clock = Clock()
    tracker = HeartbeatTracker(window=4)
    store = CalibrationStore(tmp_path, 0, tracker, "sig", clock)
    store.maybe_write()  # not begun: nothing
    assert not RunDir(tmp_path).calibration_file(0).exists()
    store.begin(attempt=0)
    tracker.step_times.append(0.4)
    clock.now += 1
    store.maybe_write()
    assert json.loads(RunDir(tmp_path).calibration_file(0).read_text())["step_times"] == []
    clock.now += 10
    store.maybe_write()
    assert json.loads(RunDir(tmp_path).calibration_file(0).read_text())["step_times"] == [0.4]


def test_a_damaged_file_starts_empty_with_one_line(tmp_path, capsys):
    assert parse("[1, 2]")[1] == "ValueError: not a JSON object"
    path = RunDir(tmp_path).calibration_file(0)
    path.parent.mkdir(mode=0o700)
    path.write_text("{not json")
    tracker = HeartbeatTracker(window=4)
    store = CalibrationStore(tmp_path, 0, tracker, "sig", Clock())
    assert store.cal.failures == [] and not tracker.step_times
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "damaged calibration" in err[0]


def test_times_from_another_layout_are_dropped_and_failures_kept(tmp_path, capsys):
    clock = Clock()
    tracker = HeartbeatTracker(window=4)
    store = CalibrationStore(tmp_path, 0, tracker, signature({"layers": 2}, 2), clock)
    store.begin(attempt=0)
    tracker.step_times.append(0.4)
    store.on_failure({"kind": "hang", "step": 3}, attempt=0)
    store.close()
    same = HeartbeatTracker(window=4)
    CalibrationStore(tmp_path, 0, same, signature({"layers": 2}, 2), clock)
    assert list(same.step_times) == [0.4]
    other = HeartbeatTracker(window=4)
    moved = CalibrationStore(tmp_path, 0, other, signature({"layers": 4}, 2), clock)
    assert not other.step_times and len(moved.cal.failures) == 1
    assert "calibrating again" in capsys.readouterr().err


def test_failure_history_sums_failures_and_takes_the_longest_node():
    nodes = [
        Calibration(failures=[{"kind": "crash", "step": 5}, {"kind": "hang", "step": 9}], exposure_s=100.0),
        Calibration(failures=[{"kind": "supervisor_lost", "step": None}], exposure_s=90.0),
        Calibration(),
    ]
    assert failure_history(nodes) == FailureHistory(3, 100.0)


def test_a_failure_at_the_step_of_the_last_one_lost_nothing_and_counts_once():
    unhealthy = [
        {"kind": "health", "step": 33},
        {"kind": "health", "step": 33},
        {"kind": "crash", "step": 40},
        {"kind": "supervisor_lost", "step": None},
        {"kind": "supervisor_lost", "step": None},
    ]
    assert failure_history([Calibration(failures=unhealthy, exposure_s=10.0)]) == FailureHistory(4, 10.0)
    assert failure_history([]) == FailureHistory(0, 0.0)


def test_the_history_the_supervisor_passes_is_the_one_the_trainer_uses(tmp_path):
    """Writer and reader agree: every node's record, through the rank environment, into the trainer's
    adaptive interval (the only way the history reaches a rank)."""
    clock = Clock()
    node1 = CalibrationStore(tmp_path, 1, HeartbeatTracker(window=4), "sig", clock)
    node1.begin(attempt=0)
    node1.on_failure({"kind": "crash", "step": 12}, attempt=0)
    clock.now += 50
    node1.write()  # 50 s supervised, as node 1 last wrote it
    node0 = CalibrationStore(tmp_path, 0, HeartbeatTracker(window=4), "sig", clock)
    node0.begin(attempt=0)
    node0.on_failure({"kind": "hang", "step": 20}, attempt=0)
    node0.on_failure({"kind": "health", "step": 20}, attempt=1)  # no step lost since: counts once
    clock.now += 70  # node 0's own time counts up to now, written or not
    damaged = RunDir(tmp_path).calibration_file(2)
    damaged.write_text("{not json")  # left out: the prior stands in for it

    environ = RankEnv(rank=3, history=node0.history()).to_environ()  # what node 0's ranks get

    env = RankEnv.from_environ(environ)  # the trainer's side
    schedule = AdaptiveInterval(
        CheckpointConfig(adaptive=True),
        tmp_path,
        attempt=1,
        is_logger=False,
        device=torch.device("cpu"),
        history=env.history,
    )
    assert (schedule.failures, schedule.exposure_s) == (2, 70.0)
    # node 1 counts the same failures; its own time up to now (the ranks agree on the largest)
    assert node1.history() == FailureHistory(2, 120.0)
