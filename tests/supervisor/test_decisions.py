"""Pure decisions of the supervisor, with injected time and state."""

import pytest

from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode
from resilient.supervisor import decisions as d
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.topology import first_host, resolve_topology

CFG = SupervisorConfig(step_timeout_initial_s=100, step_timeout_floor_s=10, step_timeout_factor=4,
                       step_timeout_min_samples=3, step_timeout_window=5, init_timeout_s=50,
                       restore_timeout_s=60, checkpoint_timeout_s=70, eval_timeout_s=80,
                       max_restarts=3, max_attempts_without_progress=2, backoff_initial_s=1, backoff_max_s=5)


def test_step_timeout_uses_initial_value_until_enough_samples():
    timeout, reason = d.calibrated_step_timeout([1.0, 1.0], CFG)
    assert timeout == 100 and "2/3" in reason


def test_step_timeout_scales_slowest_recent_step():
    timeout, reason = d.calibrated_step_timeout([9.0, 3.0, 4.0, 5.0], CFG)
    assert timeout == 36.0 and "4 x slowest" in reason


def test_step_timeout_only_looks_at_the_window():
    # 20 s fell out of the 5-sample window
    assert d.calibrated_step_timeout([20.0, 3.0, 3.0, 3.0, 3.0, 3.0], CFG)[0] == 12.0


def test_step_timeout_never_below_floor():
    timeout, reason = d.calibrated_step_timeout([0.1, 0.2, 0.1], CFG)
    assert timeout == 10 and "floor" in reason


@pytest.mark.parametrize("phase,expected", [("init", 50), ("restore", 60), ("checkpoint", 70), ("done", 70),
                                            ("eval", 80), ("step", 7.5)])
def test_phase_selects_its_timeout(phase, expected):
    assert d.phase_timeout(phase, 7.5, CFG)[0] == expected


def test_hang_declared_only_after_the_phase_timeout():
    hung, reason = d.is_hung("step", last_progress=100.0, now=112.0, step_timeout=12.5, cfg=CFG)
    assert not hung and "within step timeout" in reason
    hung, reason = d.is_hung("step", last_progress=100.0, now=113.0, step_timeout=12.5, cfg=CFG)
    assert hung and "13.0s" in reason and "step timeout 12.5s" in reason


def test_restore_phase_is_not_judged_by_the_short_step_timeout():
    assert not d.is_hung("restore", 0.0, 59.0, 1.0, CFG)[0]
    assert d.is_hung("restore", 0.0, 61.0, 1.0, CFG)[0]


@pytest.mark.parametrize("start,reached,progress", [(None, None, False), (100, None, False), (100, 100, False),
                                                    (100, 101, True), (None, 1, True)])
def test_progress_means_a_step_beyond_the_resume_point(start, reached, progress):
    assert d.made_progress(start, reached)[0] is progress


def test_backoff_is_exponential_and_capped():
    assert [d.backoff_seconds(n, CFG) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_exit_codes_are_distinct_per_outcome():
    codes = {o: d.exit_code_for(o)[0] for o in d.Outcome}
    assert codes[d.Outcome.FINISHED] is ExitCode.FINISHED
    assert codes[d.Outcome.PREEMPTED] is ExitCode.PREEMPTED
    assert codes[d.Outcome.UNHEALTHY] is ExitCode.UNHEALTHY_NODE
    assert codes[d.Outcome.BUDGET_EXHAUSTED] is ExitCode.RESTART_BUDGET_EXHAUSTED
    assert codes[d.Outcome.NO_PROGRESS] is ExitCode.NO_PROGRESS
    assert len(set(codes.values())) == len(codes)


def test_restart_while_budget_and_progress_allow():
    decision = d.decide(d.JobState(restarts_done=1, no_progress_streak=1), CFG)
    assert decision.restart and decision.backoff_s == 2 and "restart 2 of 3" in decision.reason


def test_an_attempt_that_made_progress_restarts_without_backoff():
    decision = d.decide(d.JobState(restarts_done=2, no_progress_streak=0), CFG)
    assert decision.restart and decision.backoff_s == 0 and "at once" in decision.reason


def test_budget_exhausted_gives_up():
    decision = d.decide(d.JobState(restarts_done=3, no_progress_streak=0), CFG)
    assert not decision.restart and decision.exit_code is ExitCode.RESTART_BUDGET_EXHAUSTED


def test_no_progress_streak_gives_up():
    decision = d.decide(d.JobState(restarts_done=0, no_progress_streak=2), CFG)
    assert not decision.restart and decision.exit_code is ExitCode.NO_PROGRESS and "2 consecutive" in decision.reason


def test_stop_reasons_take_precedence_in_order():
    worst = d.JobState(restarts_done=9, no_progress_streak=9, preempted=True, unhealthy="node n1: gpu.xid: XID 79")
    decision = d.decide(worst, CFG)
    assert decision.exit_code is ExitCode.UNHEALTHY_NODE and "n1" in decision.reason
    assert d.decide(d.JobState(9, 9, preempted=True), CFG).exit_code is ExitCode.PREEMPTED
    assert d.decide(d.JobState(9, 9, all_finished=True, preempted=True), CFG).exit_code is ExitCode.FINISHED
    lost = d.decide(d.JobState(0, 0, missing_nodes=(1,)), CFG)
    assert lost.exit_code is ExitCode.COORDINATOR_LOST and "node(s) 1" in lost.reason


@pytest.mark.parametrize("nodelist,host", [("gpu[007-012,20],cpu1", "gpu007"), ("n1,n2", "n1"), ("single", "single"),
                                           ("rack[2-3]-n[01-04]", "rack2-n01"), ("a[5]", "a5")])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_topology_from_slurm_environment():
    env = {"SLURM_JOB_ID": "7", "SLURM_NODEID": "2", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu[10-13]",
           "SLURMD_NODENAME": "gpu12"}
    topo = resolve_topology(env, node_rank=None, nnodes=None, master_addr=None, master_port=None, default_port=29400)
    assert (topo.node_rank, topo.nnodes, topo.master_addr, topo.store_port, topo.node_name) == \
        (2, 4, "gpu10", 29400, "gpu12")


def test_topology_flags_override_slurm():
    env = {"SLURM_JOB_ID": "7", "SLURM_NODEID": "2", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu[10-13]"}
    topo = resolve_topology(env, node_rank=1, nnodes=2, master_addr="h0", master_port=1234, default_port=29400)
    assert (topo.node_rank, topo.nnodes, topo.master_addr, topo.store_port) == (1, 2, "h0", 1234)


@pytest.mark.parametrize("kwargs,msg", [({"node_rank": 3, "nnodes": 2}, "not within"),
                                        ({"node_rank": 0, "nnodes": 2}, "--master-addr is required")])
def test_topology_errors_are_config_errors(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_topology({}, master_addr=None, master_port=None, default_port=29400, **kwargs)


def test_blame_hang_prefers_the_stopped_process_then_the_lowest_step_then_the_oldest():
    from resilient.supervisor.decisions import blame_hang

    # rank 0 was SIGSTOPped; rank 1 waits in its all-reduce and looks just as stale
    assert blame_hang([(1, 6, 100.0, "sleeping"), (0, 6, 100.2, "stopped")])[0] == 0
    assert blame_hang([(0, 7, 100.0, "sleeping"), (1, 6, 101.0, "sleeping")])[0] == 1
    assert blame_hang([(0, 6, 101.0, "sleeping"), (1, 6, 100.0, "running")])[0] == 1
    rank, reason = blame_hang([(3, 6, 100.0, "sleeping")])
    assert rank == 3 and "only rank" in reason


def test_checkpoint_timeout_calibrates_from_observed_saves():
    from resilient.supervisor.config import SupervisorConfig
    from resilient.supervisor.decisions import calibrated_checkpoint_timeout, is_hung

    cfg = SupervisorConfig(checkpoint_timeout_s=900, step_timeout_floor_s=6, step_timeout_factor=3)
    assert calibrated_checkpoint_timeout([], cfg)[0] == 900
    assert calibrated_checkpoint_timeout([0.2, 0.5], cfg)[0] == 6  # the floor
    assert calibrated_checkpoint_timeout([40.0], cfg)[0] == 120
    assert calibrated_checkpoint_timeout([400.0], cfg)[0] == 900  # never beyond the configured limit
    assert is_hung("checkpoint", 100.0, 107.0, 1.0, cfg, checkpoint_timeout=6.0)[0]
    assert not is_hung("checkpoint", 100.0, 107.0, 1.0, cfg)[0]


def test_final_step_must_be_committed_to_finish():
    assert d.final_step_committed(16, 16)[0]
    ok, why = d.final_step_committed(16, 4)
    assert not ok and "newest committed: step 4" in why
    assert "newest committed: none" in d.final_step_committed(16, None)[1]
    finished_uncommitted = d.JobState(0, 0, all_finished=True, storage=why)
    got = d.decide(finished_uncommitted, CFG)
    assert got.exit_code is ExitCode.STORAGE_FAULT and not got.restart and "step 4" in got.reason


def test_storage_trouble_is_its_own_outcome_never_a_node_fault_nor_a_preemption():
    got = d.decide(d.JobState(0, 0, preempted=True, storage="node n0: node.ckpt_dir: 0.1 GiB free"), CFG)
    assert got.outcome is d.Outcome.STORAGE_FAULT and got.exit_code is ExitCode.STORAGE_FAULT
    assert d.exit_code_for(d.Outcome.STORAGE_FAULT)[0] is not ExitCode.UNHEALTHY_NODE


@pytest.mark.parametrize("code", [ExitCode.CONFIG_ERROR, ExitCode.CHECKPOINT_DAMAGED])
def test_config_or_checkpoint_error_in_a_rank_ends_the_run_at_once(code):
    assert d.rank_exit_is_final(int(code)) and not d.rank_exit_is_final(3) and not d.rank_exit_is_final(None)
    got = d.decide(d.JobState(0, 0, final_rank_exit=(int(code), "rank 1 exited with code 64")), CFG)
    assert not got.restart and got.exit_code is code and "not retried" in got.reason


def test_all_done_counts_ranks_lingering_after_done():
    assert d.all_done([("done", None), ("step", 0)])
    assert not d.all_done([("done", None), ("step", None)])
    assert not d.all_done([("done", None), ("done", 3)])


def test_final_step_to_check_knows_whose_checkpoints_it_can_read():
    assert d.final_step_to_check(True, None, 16, 16, 4) == 16  # own trainer: train.steps, saves or not
    assert d.final_step_to_check(True, None, 16, None, None) == 16
    assert d.final_step_to_check(False, None, 16, 100, 30) == 100  # a readable layout: the step reached
    assert d.final_step_to_check(False, None, 16, 100, None) is None  # its own format: cannot be checked
    assert d.final_step_to_check(False, None, 16, None, 30) is None  # exit-only: no step reported
    # configured: a script that saves in a readable layout is checked even when every save was refused
    assert d.final_step_to_check(False, True, 16, 6, None) == 6
    assert d.final_step_to_check(True, False, 16, 16, None) is None
