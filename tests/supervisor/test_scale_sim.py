"""The supervisors' real coordination code for 64 simulated slots (62 nodes x 8 fake ranks, 2 spares) against
real stores (bench/scale/simulate.py): a rank failure restarts every node, a silent node is replaced by a spare,
a silent coordinator is replaced by an election, a preemption stops every node.
How fast is measured by bench/scale (docs/scale.md), not asserted here."""

from __future__ import annotations

import json

import pytest

from bench.scale.simulate import scenario
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.coordination import intervals


@pytest.mark.timeout(180)
def test_64_nodes_restart_replace_elect_and_stop_together(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    # raises unless every live slot stopped, restarted, replaced, elected and ended preempted
    got = scenario(64, run_dir, steady_s=1.0, spares=2, cfg={"node_lease_s": 2.0})
    [(first, why), (second, lost), (third, coordinator), (fourth, _)] = got["decisions"]
    assert first == "restart" and "restart 1 of" in why
    assert second == third == "restart" and "replace node 61 (lost)" in lost and "replace node 0 (lost)" in coordinator
    assert fourth == "preempted"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and len(status["ranks"]) == 62 * 8
    assert status["attempt"] == 3 and status["restarts"] == 3
    assert "simulated preemption" in status["stop"]["reason"] and status["stop"]["node"] == 32
    assert status["roster"]["epoch"] == 1 and status["roster"]["spares"] == []
    assert len(status["nodes"]) == 62


def test_poll_and_status_intervals_keep_the_store_within_its_budget():
    cfg = SupervisorConfig(store_ops_budget=8000)
    small, large = intervals(8, cfg), intervals(8192, cfg)
    assert (small.poll_s, small.status_s) == (cfg.poll_interval_s, cfg.status_interval_s)
    assert 8192 / large.poll_s + 8192 / large.status_s <= 0.75 * 8000 + 1e-6
    assert "budget" in large.reason


def test_planner_restart_cost_uses_the_measured_coordination_at_the_node_count():
    from resilient.planner import Assumptions, Layout, make_plan, restart_coordination_seconds
    from trainer.presets import PRESETS

    small, _ = restart_coordination_seconds(2)
    large, why = restart_coordination_seconds(1024)
    assert 0 < small < large < 10 and "measured" in why
    assert "extrapolated" in restart_coordination_seconds(16384)[1]
    plan = make_plan(
        PRESETS["tiny"],
        Layout(tp=1, pp=1, cp=1, dp=16),
        seq_len=64,
        micro_batch=1,
        global_batch=16,
        assume=Assumptions(mtbf_hours=10.0, gpus_per_node=8),
    )
    coordination, _ = restart_coordination_seconds(2)
    assert plan.restart_coordination_seconds == coordination
    assert plan.restart_seconds == coordination + Assumptions.restart_overhead_s + plan.ckpt_write_seconds
