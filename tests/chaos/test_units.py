"""Pure parts of the chaos suite and of the numerical-fault handling, without processes."""

from __future__ import annotations

import itertools
import math

import pytest

from resilient.chaos.checks import false_alarms, recomputed_executions
from resilient.chaos.schedule import Trigger, build_schedule, due
from resilient.core.errors import ConfigError
from trainer.numerics import LossHistory, SkippingLoader, judge_loss, rollback_allowed


def test_mtbf_schedule_is_seeded_and_has_the_mean():
    a = build_schedule("mtbf:40", ["kill_rank", "hang_rank"], seed=3)
    assert a == build_schedule("mtbf:40", ["kill_rank", "hang_rank"], seed=3)
    assert a != build_schedule("mtbf:40", ["kill_rank", "hang_rank"], seed=4)
    gaps = [b.at - x.at for x, b in itertools.pairwise(a)]
    assert 36 < sum(gaps) / len(gaps) < 44
    assert {t.fault for t in a} == {"kill_rank", "hang_rank"}


def test_step_schedule_cycles_faults_in_order():
    got = build_schedule("steps:12,4,8", ["preempt", "kill_rank"], seed=0)
    assert got == [Trigger("preempt", "step", 4), Trigger("kill_rank", "step", 8), Trigger("preempt", "step", 12)]
    assert due(got[0], step=4, training_seconds=None) and not due(got[1], step=7, training_seconds=99)
    assert not due(Trigger("x", "time", 5), step=100, training_seconds=None)


@pytest.mark.parametrize("spec", ["mtbf:0", "mtbf:x", "steps:", "steps:-1", "often", "times:1,a"])
def test_bad_schedules_are_config_errors(spec):
    with pytest.raises(ConfigError):
        build_schedule(spec, ["kill_rank"], seed=0)


def test_judge_loss():
    assert judge_loss(math.nan, [], spike_factor=0, window=3).fault == "nan"
    assert judge_loss(math.inf, [], spike_factor=0, window=3).fault == "inf"
    assert judge_loss(30.0, [3.0, 2.0], spike_factor=2, window=3).fault is None  # too little history
    assert judge_loss(7.0, [3.0, 2.0, 3.0], spike_factor=2, window=3).fault == "spike"
    assert judge_loss(5.9, [3.0, 2.0, 3.0], spike_factor=2, window=3).fault is None
    assert judge_loss(1e9, [3.0, 2.0, 3.0], spike_factor=0, window=3).fault is None  # spikes off


def test_rollback_needs_a_checkpoint_and_budget():
    assert rollback_allowed(0, 5, 12)[0]
    assert not rollback_allowed(0, 5, None)[0]
    ok, why = rollback_allowed(5, 5, 12)
    assert not ok and "max_rollbacks=5" in why


def test_loss_history_forgets_undone_steps():
    h = LossHistory()
    for step, loss in enumerate([5.0, 4.0, 3.0, 2.0], start=1):
        h.add(step, loss)
    assert h.before(4) == [5.0, 4.0, 3.0]
    h.forget_after(2)
    assert h.before(10) == [5.0, 4.0]


class ListLoader:
    """Stand-in for the train loader: one step = `batch` consecutive sample numbers."""

    def __init__(self, batch: int) -> None:
        self.batch, self.pos = batch, 0

    def next_step(self):
        out = list(range(self.pos, self.pos + self.batch))
        self.pos += self.batch
        return out

    def state_dict(self):
        return {"consumed_samples": self.pos}

    def load_state_dict(self, sd):
        self.pos = sd["consumed_samples"]

    def close(self):
        pass


def test_skipping_loader_jumps_windows_and_keeps_them_in_its_state():
    loader = SkippingLoader(ListLoader(4))
    loader.skip(4, 8)
    assert loader.next_step() == [0, 1, 2, 3]
    assert loader.next_step() == [8, 9, 10, 11]
    saved = loader.state_dict()
    assert saved["skips"] == [[4, 8]]
    fresh = SkippingLoader(ListLoader(4))  # a new process resuming from a checkpoint before the window
    fresh.load_state_dict({**saved, "consumed_samples": 0})
    assert [fresh.next_step()[0] for _ in range(3)] == [0, 8, 12]
    loader.skip(12, 16)  # a rollback: loading an older state keeps the window just added
    loader.load_state_dict({"consumed_samples": 4, "skips": []})
    assert loader.skips == [(4, 8), (12, 16)] and loader.next_step() == [8, 9, 10, 11]


def test_recomputed_executions_counts_earlier_occurrences():
    log = [{"step": s, "step_time": 1.0} for s in (1, 2, 3, 4, 3, 4, 5)] + [{"step": 5, "val_loss": 1.0}]
    assert recomputed_executions(log) == (2, 2.0)


def test_a_failure_no_injected_fault_explains_is_a_false_alarm():
    hang, exit_, health = ({"kind": k, "reason": k} for k in ("hang", "rank_exit", "health"))
    # a hang_rank and a gpu_health injection explain one hang and one health failure, in either order
    assert false_alarms([health, hang], [{"hang"}, {"health"}]) == []
    # a second hang (a slow first step after a restart, judged by the steady-state timeout) is not explained
    assert false_alarms([hang, exit_, hang], [{"hang"}, {"rank_exit"}]) == [hang]
    assert false_alarms([exit_], [set()]) == [exit_]  # a preemption sets off no failure
