"""The adaptive checkpoint interval's pure parts: Young/Daly, bounds, prior vs observed failures, save cost."""

from __future__ import annotations

import pytest

from resilient.core.configbase import parse_section
from resilient.core.errors import ConfigError
from trainer.checkpoint.config import CheckpointConfig
from trainer.checkpoint.interval import (
    CostMeter,
    choose_interval,
    daly_interval,
    estimate_mtbf,
    restored_interval,
    save_cost,
    worth_changing,
    young_interval,
)
from trainer.checkpoint.policy import should_save

HOUR = 3600.0


def test_daly_is_young_to_first_order_and_below_it_for_costly_saves():
    assert daly_interval(1.0, 1e6) == pytest.approx(young_interval(1.0, 1e6), rel=1e-3)
    assert daly_interval(300, 6 * HOUR) < young_interval(300, 6 * HOUR)


def test_interval_is_daly_in_median_steps():
    steps, why = choose_interval(save_cost_s=2.0, step_s=0.5, mtbf_s=HOUR, min_steps=1, max_steps=10_000)
    assert steps == round(daly_interval(2.0, HOUR) / 0.5)
    assert "Daly" in why and "bounded" not in why


def test_interval_is_held_within_bounds():
    assert choose_interval(save_cost_s=0.01, step_s=1.0, mtbf_s=60, min_steps=5, max_steps=100)[0] == 5
    high, why = choose_interval(save_cost_s=30.0, step_s=0.1, mtbf_s=24 * HOUR, min_steps=5, max_steps=100)
    assert high == 100 and "bounded to [5, 100]" in why


def test_free_saves_take_the_lower_bound_and_unmeasured_steps_the_upper():
    assert choose_interval(save_cost_s=0.0, step_s=1.0, mtbf_s=HOUR, min_steps=3, max_steps=50)[0] == 3
    assert choose_interval(save_cost_s=1.0, step_s=0.0, mtbf_s=HOUR, min_steps=3, max_steps=50)[0] == 50


def test_more_failures_mean_shorter_intervals():
    calm = choose_interval(
        save_cost_s=1.0, step_s=0.2, mtbf_s=estimate_mtbf(HOUR, 0, 600)[0], min_steps=1, max_steps=10_000
    )[0]
    stormy = choose_interval(
        save_cost_s=1.0, step_s=0.2, mtbf_s=estimate_mtbf(HOUR, 20, 600)[0], min_steps=1, max_steps=10_000
    )[0]
    assert stormy < calm


def test_prior_rules_a_young_run_and_observation_an_old_one():
    assert estimate_mtbf(24 * HOUR, 0, 0)[0] == 24 * HOUR
    young, why = estimate_mtbf(24 * HOUR, 1, 60)
    assert young == pytest.approx((24 * HOUR + 60) / 2) and "1 failures" in why
    # 100 failures in 100 hours: close to the observed 1 h, whatever the prior said
    assert estimate_mtbf(24 * HOUR, 100, 100 * HOUR)[0] == pytest.approx(124 * HOUR / 101)


def test_save_cost_is_the_extra_wall_time_not_the_blocking_call():
    # blocking 0.1 s in the save's iteration, then two steps slowed by the background write
    assert save_cost([1.1, 1.6, 1.3, 1.0], baseline=1.0) == pytest.approx(1.0)
    assert save_cost([0.9, 1.0], baseline=1.0) == 0.0


def test_meter_measures_each_save_over_its_window_against_plain_iterations():
    meter = CostMeter(window=3, warmup=2, first_saves=0)
    assert not meter.iteration(9.0) and not meter.iteration(5.0)  # warm-up: neither baseline nor cost
    for _ in range(5):
        assert not meter.iteration(1.0)
    meter.saved()
    assert not meter.iteration(1.2) and not meter.iteration(2.0)
    assert meter.iteration(1.3)  # the window closes: one cost measured
    assert meter.cost() == pytest.approx(1.5) and meter.baseline() == 1.0
    meter.saved()
    assert not meter.iteration(1.5)
    meter.saved()  # the next save closes a window still open with what it has
    assert meter.costs[-1] == pytest.approx(0.5)


def test_a_save_costs_at_least_its_blocking_time():
    # the soak's steps after a save sometimes ran faster than the median: a cost of 0 sent the interval
    # to its lower bound (2 steps) and back, again and again
    meter = CostMeter(window=2, warmup=0, first_saves=0)
    for _ in range(3):
        meter.iteration(1.0)
    meter.saved(blocking_s=0.05)
    meter.iteration(0.98)
    assert meter.iteration(0.99) and meter.cost() == pytest.approx(0.05)
    meter.saved(blocking_s=0.05)
    meter.iteration(1.3)
    assert meter.iteration(1.0) and meter.costs[-1] == pytest.approx(0.3)  # more than the floor: measured


def test_a_process_first_save_is_not_its_cost():
    meter = CostMeter(window=1, warmup=0)  # first_saves=1
    meter.iteration(1.0)
    meter.saved()
    assert not meter.iteration(3.0)  # allocations a later save reuses: neither cost nor baseline
    assert meter.costs == [] and meter.plain == [1.0]
    meter.saved()
    assert meter.iteration(1.5) and meter.cost() == pytest.approx(0.5)


def test_meter_window_stays_open_while_the_write_is_in_flight():
    meter = CostMeter(window=2, warmup=0, longest=6, first_saves=0)
    for _ in range(3):
        meter.iteration(1.0)
    meter.iteration(1.0, in_flight=True)  # another save's write still running: not a baseline iteration
    assert meter.plain == [1.0, 1.0, 1.0]
    meter.saved()
    assert not meter.iteration(1.1, in_flight=True) and not meter.iteration(1.5, in_flight=True)
    assert not meter.iteration(1.4, in_flight=True)  # past the window, but the write goes on
    assert meter.iteration(1.0, in_flight=False)
    assert meter.cost() == pytest.approx(1.0)
    meter.saved()
    assert [meter.iteration(1.0, in_flight=True) for _ in range(6)] == [False] * 5 + [True]  # `longest` bounds it


def test_writes_outlasting_the_interval_still_measure_a_cost():
    # Every write is still in flight when the next save comes (a loaded machine): no quiet iteration
    # ever runs, and each window is closed by the next save. Each closing still reports a cost, against
    # the fastest iteration seen, so the interval adapts (a CI run once never decided).
    meter = CostMeter(window=2, warmup=0, first_saves=0)
    results = []
    for _ in range(3):
        meter.saved()
        results += [meter.iteration(s, in_flight=True) for s in (2.0, 1.5, 1.0)]
    assert results == [False, False, False, True, False, False, True, False, False]
    assert meter.plain == [] and meter.baseline() == 1.0 and meter.cost() == pytest.approx(1.5)


def test_only_quiet_iterations_are_baseline():
    meter = CostMeter(window=2, warmup=0, first_saves=0)
    meter.iteration(5.0, quiet=False)  # another tier saved, or its write ran, in this iteration
    meter.iteration(1.0)
    assert meter.plain == [1.0]


def test_the_interval_moves_only_for_a_real_difference():
    assert not worth_changing(40, 46, min_steps=1, max_steps=100)  # 15 %: noise
    assert worth_changing(40, 50, min_steps=1, max_steps=100) and worth_changing(40, 30, min_steps=1, max_steps=100)
    assert worth_changing(3, 4, min_steps=4, max_steps=8)  # outside the bounds: any change
    assert not worth_changing(5, 5, min_steps=4, max_steps=8)


def test_a_new_attempt_starts_from_the_last_measured_cost():
    meter = CostMeter(window=1, warmup=0, first_saves=0)
    meter.seed(0.5)
    meter.iteration(1.0)
    meter.saved()
    assert meter.iteration(1.0)  # this attempt's first save measured free: one sample, not the verdict
    assert meter.cost() == pytest.approx(0.25)


def test_a_new_attempt_continues_from_the_last_chosen_interval():
    assert restored_interval(37, 100, 100, min_steps=4, max_steps=200) == 37
    assert restored_interval(37, None, 100, min_steps=4, max_steps=200) == 37  # a record older than the field
    assert restored_interval(0, None, 100, min_steps=4, max_steps=200) == 100  # nothing chosen yet
    assert restored_interval(300, 100, 100, min_steps=4, max_steps=200) == 200  # bounds changed across a requeue
    assert restored_interval(37, 100, 50, min_steps=4, max_steps=200) == 50  # the operator changed the config


def test_config_refuses_crossed_bounds_and_adaptive_without_a_start():
    with pytest.raises(ConfigError, match="min_interval_steps 9 exceeds max_interval_steps 3"):
        parse_section(CheckpointConfig, {"min_interval_steps": 9, "max_interval_steps": 3})
    with pytest.raises(ConfigError, match="adaptive needs interval_steps > 0"):
        parse_section(CheckpointConfig, {"adaptive": True, "interval_steps": 0})


def test_an_adaptive_interval_counts_from_the_last_save_a_fixed_one_at_multiples():
    def due(cfg: CheckpointConfig, step: int, last: int | None) -> bool:
        return should_save(
            cfg,
            interval_steps=cfg.interval_steps,
            step=step,
            final_step=1000,
            last_save_step=last,
            seconds_since_save=0.0,
            stop_requested=False,
        ).yes

    fixed = CheckpointConfig(interval_steps=127)
    adaptive = CheckpointConfig(interval_steps=127, adaptive=True)
    assert due(fixed, 381, last=375)  # a multiple of the new interval, 6 steps after the last save
    assert not due(adaptive, 381, last=375) and due(adaptive, 502, last=375)
    assert due(adaptive, 127, last=None) and not due(adaptive, 128, last=None)  # no save yet this attempt


def test_adaptive_memory_interval_counts_from_the_last_snapshot():
    from trainer.checkpoint.policy import should_snapshot

    assert should_snapshot(7, step=21, final_step=100, disk_saved=False).yes  # fixed: multiples
    assert not should_snapshot(7, step=22, final_step=100, disk_saved=False).yes
    assert should_snapshot(7, step=22, final_step=100, disk_saved=False, last_snapshot=15).yes
    assert not should_snapshot(7, step=21, final_step=100, disk_saved=False, last_snapshot=15).yes
