"""Goodput from synthetic ledgers and train logs (pure, injected time)."""

from __future__ import annotations

import pytest

from resilient.goodput import BADPUT_CATEGORIES, compute_goodput, render

T0 = 1_700_000_000.0


def steps(first: int, last: int, start_ts: float, step_time: float, attempt: int = 0) -> list[dict]:
    return [
        {
            "ts": start_ts + (s - first + 1) * step_time,
            "attempt": attempt,
            "step": s,
            "loss": 3.0,
            "step_time": step_time,
            "tokens": s * 1000,
            "tokens_per_s": 1000 / step_time,
        }
        for s in range(first, last + 1)
    ]


def test_clean_run_is_all_productive_except_startup_and_saves():
    ledger = [
        {"ts": T0, "event": "run_start", "attempt": 0, "node": "n0", "slurm_job_id": None, "slurm_restart_count": None},
        {"ts": T0 + 1, "event": "attempt_start", "attempt": 0, "node": "n0"},
        {"ts": T0 + 11, "event": "rank_init", "rank": 0, "attempt": 0, "seconds": 10.0},
        {"ts": T0 + 12, "event": "rank_init", "rank": 1, "attempt": 0, "seconds": 11.0},
        {"ts": T0 + 62, "event": "ckpt_save", "step": 50, "blocking_seconds": 2.0, "total_seconds": 5.0, "bytes": 10},
    ]
    log = steps(1, 100, T0 + 12, 1.0)
    report = compute_goodput(ledger, log, now=T0 + 125)
    assert report.wall_seconds == 125
    assert report.productive_seconds == pytest.approx(100.0)
    assert report.badput_seconds["startup"] == 11.0  # ranks init in parallel: the slowest counts
    assert report.badput_seconds["checkpoint_save"] == 2.0
    assert report.badput_seconds["lost_progress"] == 0.0
    assert report.badput_seconds["other"] == pytest.approx(125 - 100 - 11 - 2)
    assert report.ratio == pytest.approx(100 / 125)
    assert report.last_checkpoint_step == 50 and report.last_checkpoint_ts == T0 + 62


def test_injected_failure_loses_the_recomputed_steps():
    """Steps 51-70 run, rank dies at 70, restart from checkpoint 50: 51-70 are computed twice."""
    ledger = [
        {"ts": T0, "event": "run_start", "attempt": 0, "node": "n0"},
        {"ts": T0 + 5, "event": "rank_init", "rank": 0, "attempt": 0, "seconds": 5.0},
        {"ts": T0 + 56, "event": "ckpt_save", "step": 50, "blocking_seconds": 1.0, "total_seconds": 3.0, "bytes": 10},
        {
            "ts": T0 + 80,
            "event": "failure",
            "kind": "rank_exit",
            "rank": 1,
            "node": "n0",
            "step": 70,
            "latency_seconds": 0.5,
            "reason": "exit 1",
        },
        {"ts": T0 + 81, "event": "restart", "attempt": 1, "backoff_seconds": 4.0, "reason": "rank_exit"},
        {"ts": T0 + 91, "event": "rank_init", "rank": 0, "attempt": 1, "seconds": 5.0},
        {"ts": T0 + 94, "event": "ckpt_load", "rank": 0, "attempt": 1, "step": 50, "seconds": 3.0},
        {"ts": T0 + 94, "event": "ckpt_load", "rank": 1, "attempt": 1, "step": 50, "seconds": 2.5},
    ]
    step_time = 1.0
    log = steps(1, 70, T0 + 5, step_time) + steps(51, 100, T0 + 94, step_time, attempt=1)
    report = compute_goodput(ledger, log, now=T0 + 150)
    assert report.recomputed_steps == 20
    assert report.badput_seconds["lost_progress"] == pytest.approx(20 * step_time)
    assert report.productive_steps == 100
    assert report.productive_seconds == pytest.approx(100 * step_time)
    assert report.ratio < 1
    assert report.badput_seconds["startup"] == 10.0  # 5 s in each of two attempts
    assert report.badput_seconds["checkpoint_restore"] == 3.0
    assert report.badput_seconds["waiting"] == 4.0
    accounted = report.productive_seconds + sum(report.badput_seconds.values())
    assert accounted == pytest.approx(report.wall_seconds)


def test_requeue_gap_is_waiting_and_multinode_run_starts_are_one_allocation():
    job = {"slurm_job_id": "77", "slurm_restart_count": 0}
    requeued = {"slurm_job_id": "77", "slurm_restart_count": 1}
    ledger = [
        {"ts": T0, "event": "run_start", "attempt": 0, "node": "n0", **job},
        {"ts": T0 + 1, "event": "run_start", "attempt": 0, "node": "n1", **job},  # same allocation
        {"ts": T0 + 30, "event": "preempted", "step": 20, "node": "n0"},
        {"ts": T0 + 31, "event": "requeue", "job_id": "77", "exclude": [], "reason": "preempted"},
        # the queue: nothing happens for 600 s
        {"ts": T0 + 631, "event": "run_start", "attempt": 0, "node": "n0", **requeued},
        {"ts": T0 + 632, "event": "run_start", "attempt": 0, "node": "n1", **requeued},
    ]
    log = steps(1, 20, T0 + 5, 1.0) + steps(21, 30, T0 + 640, 1.0)
    report = compute_goodput(ledger, log, now=T0 + 700)
    assert report.badput_seconds["waiting"] == pytest.approx(631 - 31)
    assert report.productive_seconds == pytest.approx(30.0)
    assert report.wall_seconds == 700


def test_no_run_start_gives_an_empty_report_and_render_says_so():
    report = compute_goodput([], [], now=T0)
    assert report.wall_seconds == 0 and report.ratio == 0.0
    assert set(report.badput_seconds) == set(BADPUT_CATEGORIES)
    assert "n/a" in render(report)


def test_failed_saves_are_counted_and_rendered():
    ledger = [
        {"ts": T0, "event": "run_start", "attempt": 0, "node": "n0"},
        {"ts": T0 + 10, "event": "ckpt_save_failed", "step": 10, "error": "ENOSPC"},
        {"ts": T0 + 20, "event": "ckpt_save", "step": 20, "blocking_seconds": 1.0, "total_seconds": 2.0, "bytes": 5},
    ]
    report = compute_goodput(ledger, steps(1, 20, T0, 0.5), now=T0 + 3600)
    text = render(report)
    assert report.failed_saves == 1
    assert "goodput 0.3%" in text
    assert "last complete checkpoint: step 20, 59m 40s ago; 1 failed saves" in text
    assert "lost progress 0s" in text
