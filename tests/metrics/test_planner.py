"""Planner: published parameter counts, Young/Daly worked values, memory, and the `resilient plan` CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from resilient.core.exit_codes import ExitCode
from resilient.planner import (
    Layout,
    daly_interval,
    daly_wall_time,
    memory_per_gpu,
    predicted_goodput,
    stage_layers,
    young_interval,
)
from trainer.flops import parameter_count
from trainer.presets import PRESETS

PLAN_405B = Path(__file__).resolve().parents[2] / "examples" / "llama31-405b.yaml"
MIN, HOUR = 60.0, 3600.0


@pytest.mark.parametrize("preset", ["llama3-8b", "llama3-70b", "llama31-405b"])
def test_parameter_count_matches_published_within_one_percent(preset):
    arch = PRESETS[preset]
    assert parameter_count(arch) == pytest.approx(arch.published_params, rel=0.01)


def test_daly_2006_worked_values():
    # Daly 2006: delta = 5 min, R = 10 min; M = 24 h -> ~117 min, M = 6 h -> ~57 min.
    assert round(daly_interval(5 * MIN, 24 * HOUR) / MIN) == 117
    assert round(daly_interval(5 * MIN, 6 * HOUR) / MIN) == 57
    # Young's first-order estimate for the same cases: sqrt(2 * 5 * 1440) = 120, sqrt(2 * 5 * 360) = 60.
    assert young_interval(5 * MIN, 24 * HOUR) / MIN == pytest.approx(120.0)
    assert young_interval(5 * MIN, 6 * HOUR) / MIN == pytest.approx(60.0)


def test_daly_interval_is_the_mtbf_when_checkpoints_cost_more_than_two_mtbfs():
    assert daly_interval(3 * HOUR, 1 * HOUR) == 1 * HOUR


def test_daly_optimum_minimises_expected_wall_time():
    delta, restart, mtbf = 5 * MIN, 10 * MIN, 6 * HOUR
    best = daly_interval(delta, mtbf)
    at_best = daly_wall_time(100 * HOUR, best, delta, restart, mtbf)
    for factor in (0.5, 0.8, 1.25, 2.0):
        assert daly_wall_time(100 * HOUR, best * factor, delta, restart, mtbf) > at_best
    goodput = predicted_goodput(best, delta, restart, mtbf)
    assert goodput < best / (best + delta)  # failures cost on top of the checkpoint overhead
    # Daly's model by hand: T_w / T_s = M e^(R/M) (e^((tau+delta)/M) - 1) / tau.
    by_hand = best / (mtbf * math.exp(restart / mtbf) * (math.exp((best + delta) / mtbf) - 1))
    assert goodput == pytest.approx(by_hand)


def test_uneven_pipeline_split_takes_layers_from_the_end_stages():
    assert stage_layers(126, 8) == [15, 16, 16, 16, 16, 16, 16, 15]
    assert stage_layers(126, 16) == [7] + [8] * 14 + [7]
    assert stage_layers(32, 4) == [8, 8, 8, 8]


def test_memory_shrinks_with_tp_and_distributed_optimizer():
    arch = PRESETS["llama3-8b"]
    kw = dict(seq_len=8192, micro_batch=1, grad_accum=8)
    plain = memory_per_gpu(arch, Layout(tp=1, pp=1, cp=1, dp=8, distributed_optimizer=False), **kw)
    # Megatron's table: bf16 params with fp32 grads cost 18 bytes per parameter without sharding.
    assert (plain.weights + plain.grads + plain.optimizer) / plain.params == pytest.approx(18.0)
    sharded = memory_per_gpu(arch, Layout(tp=1, pp=1, cp=1, dp=8, distributed_optimizer=True), **kw)
    assert (sharded.weights + sharded.grads + sharded.optimizer) / sharded.params == pytest.approx(6 + 12 / 8)
    tp8 = memory_per_gpu(arch, Layout(tp=8, pp=1, cp=1, dp=1, distributed_optimizer=False), **kw)
    assert tp8.params < plain.params / 7
    assert tp8.activations == pytest.approx(plain.activations / 8, rel=0.05)


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resilient.cli", "plan", *args], capture_output=True, text=True, timeout=120
    )


def test_plan_cli_405b_on_1024_h100s():
    proc = run_plan(str(PLAN_405B), "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["gpus"] == 1024
    assert plan["layout"] == {"tp": 8, "pp": 8, "cp": 2, "dp": 8, "distributed_optimizer": True, "world": 1024}
    assert plan["params"] == pytest.approx(405.9e9, rel=0.01)
    assert plan["checkpoint_bytes"] == pytest.approx(14 * plan["params"])
    assert plan["memory"]["total"] < 80 * 2**30
    assert plan["young_seconds"] > plan["daly_seconds"] > plan["ckpt_write_seconds"]
    assert 0.9 < plan["predicted_goodput"] < 1.0
    # replica checks at the default interval (10 steps) cost far under 1% of step time
    assert 0 < plan["replica_check"]["share"] < 0.01 and "every 10 steps" in plan["replica_check"]["reason"]


def test_replica_check_cost_is_one_read_of_the_weights_and_a_latency_bound_gather():
    from resilient.planner import replica_check_seconds

    assert replica_check_seconds(3.35e9, 1, hbm_gbps=3350.0) == pytest.approx(1e-3)
    assert replica_check_seconds(0.0, 1025, hop_s=1e-5) == pytest.approx(1024e-5)


def test_plan_cli_gpus_and_mtbf_change_the_interval():
    base = json.loads(run_plan(str(PLAN_405B), "--json", "--mtbf-hours", "24").stdout)
    assert base["mtbf_seconds"] == 24 * HOUR
    doubled = json.loads(
        run_plan(str(PLAN_405B), "--json", "--gpus", "2048", "--mtbf-hours", "24", "--ckpt-write-gbps", "400").stdout
    )
    assert doubled["gpus"] == 2048 and doubled["layout"]["dp"] == 16
    assert doubled["ckpt_write_seconds"] == pytest.approx(base["ckpt_write_seconds"] / 4)
    assert doubled["daly_seconds"] < base["daly_seconds"]
    text = run_plan(str(PLAN_405B), "--mtbf-hours", "24").stdout
    assert "parameters        405.85B (published 405.9B)" in text
    assert "Daly" in text and "predicted goodput" in text


def test_plan_cli_rejects_a_gpu_count_that_does_not_fill_nodes():
    proc = run_plan(str(PLAN_405B), "--gpus", "1020")
    assert proc.returncode == ExitCode.CONFIG_ERROR
    assert "--gpus 1020 is not a positive multiple of supervisor.nproc_per_node=8" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_plan_cli_checks_the_resized_layout_with_the_run_config_validator():
    proc = run_plan(str(PLAN_405B), "--gpus", "1000")  # 125 nodes: not a multiple of tp*pp*cp = 128
    assert proc.returncode == ExitCode.CONFIG_ERROR
    assert "world size 1000" in proc.stderr and "tp*pp*cp = 128" in proc.stderr


def test_spare_nodes_cover_node_failures_poisson_and_raise_the_predicted_goodput():
    import math

    from resilient.planner import Assumptions, Layout, make_plan, spare_cover
    from trainer.presets import PRESETS

    none, two = spare_cover(0, 1.5), spare_cover(2, 1.5)
    assert none.probability == math.exp(-1.5) and none.covered_share == 0.0
    assert two.probability == math.exp(-1.5) * (1 + 1.5 + 1.5**2 / 2)
    # E[min(N, 2)] / E[N]: one failure is always covered, a second one when it happens
    covered = (1 * 1.5 * math.exp(-1.5) + 2 * (1 - math.exp(-1.5) - 1.5 * math.exp(-1.5))) / 1.5
    assert math.isclose(two.covered_share, covered)
    assert spare_cover(3, 0.0).probability == 1.0
    layout = Layout(tp=1, pp=1, cp=1, dp=16)
    plans = [
        make_plan(
            PRESETS["tiny"],
            layout,
            seq_len=64,
            micro_batch=1,
            global_batch=16,
            assume=Assumptions(mtbf_hours=2.0, gpus_per_node=8, spare_nodes=k),
        )
        for k in (0, 4)
    ]
    assert plans[0].predicted_goodput == plans[0].predicted_goodput_without_spares
    assert plans[1].predicted_goodput > plans[1].predicted_goodput_without_spares
    assert plans[1].node_restart_seconds < plans[1].node_restart_without_spares_seconds
