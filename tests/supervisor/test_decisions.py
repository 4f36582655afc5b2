"""Node 0's restart decision as a pure function of typed node reports and what node 0 knows."""

import json

import pytest

from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode
from resilient.core.outcome import Outcome, exit_code_for
from resilient.supervisor import decisions as d
from resilient.supervisor import wire
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.decisions import AttemptContext, NodeFault, NodeFaultKind
from resilient.supervisor.reports import NodeOutcome, NodeReport, RankExit, StopKind, StopRequest
from resilient.supervisor.topology import expand_hostlist, first_host, resolve_topology

CFG = SupervisorConfig(max_restarts=3, max_attempts_without_progress=2, backoff_initial_s=1, backoff_max_s=5)
FAILED, FINISHED, PREEMPTED = NodeOutcome.FAILED, NodeOutcome.FINISHED, NodeOutcome.PREEMPTED


def stuck(node=0, outcome=FAILED, **kw):
    """A node's report of an attempt that made no progress (resumed at 10, reached 10)."""
    return NodeReport(node, outcome, start_step=10, reached_step=10, **kw)


def moved(node=0, outcome=FAILED, **kw):
    """A node's report of an attempt that made progress (10 -> 14)."""
    return NodeReport(node, outcome, start_step=10, reached_step=14, **kw)


def unhealthy(node, why="gpu.xid: XID 79"):
    return NodeReport(node, NodeOutcome.UNHEALTHY, start_step=10, reached_step=12, unhealthy=f"node n{node}: {why}")


def ctx(restarts=0, streak=0, nnodes=1, stop=None, newest=None, steps=16, save_on_finish=True):
    return AttemptContext(
        nnodes=nnodes,
        restarts_done=restarts,
        no_progress_streak=streak,
        train_steps=steps,
        stop=stop,
        newest_committed=newest,
        save_on_finish=save_on_finish,
    )


def stop(kind=StopKind.PREEMPTED, reason="node 0: supervisor received SIGTERM"):
    return StopRequest(kind, reason, node=0, pid=123, host="h0")


def decision(reports, context):
    return d.decide_attempt({r.node: r for r in reports}, context, CFG)


def test_exit_codes_are_distinct_per_outcome():
    codes = {o: exit_code_for(o)[0] for o in Outcome}
    assert codes[Outcome.FINISHED] is ExitCode.FINISHED
    assert codes[Outcome.PREEMPTED] is ExitCode.PREEMPTED
    assert codes[Outcome.UNHEALTHY] is ExitCode.UNHEALTHY_NODE
    assert codes[Outcome.BUDGET_EXHAUSTED] is ExitCode.RESTART_BUDGET_EXHAUSTED
    assert codes[Outcome.NO_PROGRESS] is ExitCode.NO_PROGRESS
    assert len(set(codes.values())) == len(codes)


def test_restart_with_backoff_while_budget_and_progress_allow():
    got = decision([stuck()], ctx(restarts=1, streak=0))
    assert got.restart and got.outcome is None and got.exit_code is None
    assert got.backoff_s == 2 and "restart 2 of 3" in got.reason and got.no_progress_streak == 1


def test_an_attempt_that_made_progress_restarts_without_backoff_and_resets_the_streak():
    got = decision([moved()], ctx(restarts=2, streak=1))
    assert got.restart and got.backoff_s == 0 and "at once" in got.reason
    assert got.no_progress_streak == 0 and got.reached_step == 14


def test_budget_exhausted_gives_up():
    got = decision([moved()], ctx(restarts=3))
    assert not got.restart and got.exit_code is ExitCode.RESTART_BUDGET_EXHAUSTED


def test_no_progress_streak_gives_up():
    got = decision([stuck()], ctx(streak=1))
    assert got.exit_code is ExitCode.NO_PROGRESS and "2 consecutive" in got.reason and got.no_progress_streak == 2


def test_progress_counts_over_all_nodes_from_the_lowest_resume_step():
    # node 1 resumed from an older step: the attempt progressed from 8 to 10 (the highest step reached)
    reports = [NodeReport(0, FAILED, 10, 10), NodeReport(1, FAILED, 8, 9)]
    got = decision(reports, ctx(nnodes=2, streak=1))
    assert got.restart and got.no_progress_streak == 0 and got.reached_step == 10


def test_stop_reasons_take_precedence_in_order():
    worst = decision([stuck(0, PREEMPTED), unhealthy(1)], ctx(restarts=9, streak=9, nnodes=2, stop=stop()))
    assert worst.exit_code is ExitCode.UNHEALTHY_NODE and "node n1: gpu.xid" in worst.reason
    assert decision([stuck(0, PREEMPTED)], ctx(9, 9)).exit_code is ExitCode.PREEMPTED
    assert decision([stuck()], ctx(9, 9, stop=stop())).exit_code is ExitCode.PREEMPTED
    finished = decision([moved(0, FINISHED)], ctx(9, 9, stop=stop(), newest=16))
    assert finished.exit_code is ExitCode.FINISHED and finished.reason == "all ranks finished"
    lost = decision([moved()], ctx(nnodes=2))
    assert lost.exit_code is ExitCode.COORDINATOR_LOST and "node 1 did not report" in lost.reason
    assert lost.faulty_nodes == (NodeFault(1, NodeFaultKind.MISSING, "the supervisor of node 1 did not report"),)


def test_every_node_at_fault_is_named_unhealthy_first_then_missing():
    got = decision([unhealthy(2), moved(0), unhealthy(1, "rank.exit: UNHEALTHY_NODE")], ctx(nnodes=4))
    assert got.outcome is Outcome.UNHEALTHY and got.exit_code is ExitCode.UNHEALTHY_NODE
    assert "node n1: rank.exit" in got.reason and "node n2: gpu.xid" in got.reason
    assert [(f.node, f.kind) for f in got.faulty_nodes] == [
        (1, NodeFaultKind.UNHEALTHY),
        (2, NodeFaultKind.UNHEALTHY),
        (3, NodeFaultKind.MISSING),
    ]


def test_a_rank_exiting_unhealthy_node_condemns_its_node_not_the_run_config():
    assert d.rank_exit_condemns_node(int(ExitCode.UNHEALTHY_NODE)) and not d.rank_exit_is_final(76)
    assert not d.rank_exit_condemns_node(3) and not d.rank_exit_condemns_node(None)


def test_the_final_step_must_be_committed_to_finish():
    assert d.final_step_committed(16, 16)[0]
    ok, why = d.final_step_committed(16, 4)
    assert not ok and "newest committed: step 4" in why
    assert "newest committed: none" in d.final_step_committed(16, None)[1]
    got = decision([moved(0, FINISHED)], ctx(newest=4))
    assert got.outcome is Outcome.STORAGE_FAULT and got.exit_code is ExitCode.STORAGE_FAULT
    assert got.final_step_uncommitted and "step 4" in got.reason
    # not checked when the run does not save its final step
    assert decision([moved(0, FINISHED)], ctx(newest=4, save_on_finish=False)).outcome is Outcome.FINISHED


def test_another_script_is_checked_at_the_step_it_reached_once_its_checkpoints_are_readable():
    other = CFG.model_copy(update={"rank_command": ["python", "train.py"]})
    finished = {0: moved(0, FINISHED)}  # reached 14
    assert d.decide_attempt(finished, ctx(newest=None), other).outcome is Outcome.FINISHED  # unreadable: unchecked
    assert d.decide_attempt(finished, ctx(newest=14), other).outcome is Outcome.FINISHED
    assert d.decide_attempt(finished, ctx(newest=12), other).outcome is Outcome.STORAGE_FAULT


def test_storage_trouble_is_its_own_outcome_never_a_node_fault_nor_a_preemption():
    trouble = stop(StopKind.STORAGE, "node n0: node.ckpt_dir: 0.1 GiB free")
    got = decision([stuck(0, PREEMPTED)], ctx(stop=trouble))
    assert got.outcome is Outcome.STORAGE_FAULT and got.exit_code is ExitCode.STORAGE_FAULT
    assert got.reason == trouble.reason and not got.final_step_uncommitted  # recorded by the node that found it
    assert exit_code_for(Outcome.STORAGE_FAULT)[0] is not ExitCode.UNHEALTHY_NODE


@pytest.mark.parametrize("code", [ExitCode.CONFIG_ERROR, ExitCode.CHECKPOINT_DAMAGED, ExitCode.STORAGE_FAULT])
def test_config_checkpoint_or_storage_error_in_a_rank_ends_the_run_at_once(code):
    assert d.rank_exit_is_final(int(code)) and not d.rank_exit_is_final(3) and not d.rank_exit_is_final(None)
    final = stuck(1, final_rank_exit=RankExit(int(code), "rank 1 exited with code 64"))
    got = decision([moved(0), final, unhealthy(2)], ctx(nnodes=3, stop=stop(StopKind.STORAGE)))
    assert not got.restart and got.exit_code is code and "not retried" in got.reason


def test_a_report_is_unhealthy_exactly_when_it_says_why():
    with pytest.raises(ValueError):
        NodeReport(0, NodeOutcome.UNHEALTHY)
    with pytest.raises(ValueError):
        NodeReport(0, FAILED, unhealthy="node n0: gpu.xid")


def test_reports_and_decisions_survive_the_store_encoding():
    report = NodeReport(
        3,
        NodeOutcome.UNHEALTHY,
        4,
        9,
        "node n3: rank 25 exited with code 76",
        RankExit(64, "rank 24 exited with code 64"),
    )
    assert wire.report_from_store(json.loads(json.dumps(wire.report_to_store(report)))) == report
    for got in (
        decision([unhealthy(1), moved(0)], ctx(nnodes=3)),
        decision([stuck()], ctx(restarts=1)),
        decision([moved(0, FINISHED)], ctx(newest=2)),
    ):
        assert wire.decision_from_store(json.loads(json.dumps(wire.decision_to_store(got)))) == got


@pytest.mark.parametrize(
    "start,reached,progress",
    [(None, None, False), (100, None, False), (100, 100, False), (100, 101, True), (None, 1, True)],
)
def test_progress_means_a_step_beyond_the_resume_point(start, reached, progress):
    assert d.made_progress(start, reached)[0] is progress


def test_backoff_is_exponential_and_capped():
    assert [d.backoff_seconds(n, CFG) for n in range(1, 6)] == [1, 2, 4, 5, 5]


def test_final_step_to_check_knows_whose_checkpoints_it_can_read():
    assert d.final_step_to_check(True, None, 16, 16, 4) == 16  # own trainer: train.steps, saves or not
    assert d.final_step_to_check(True, None, 16, None, None) == 16
    assert d.final_step_to_check(False, None, 16, 100, 30) == 100  # a readable layout: the step reached
    assert d.final_step_to_check(False, None, 16, 100, None) is None  # its own format: cannot be checked
    assert d.final_step_to_check(False, None, 16, None, 30) is None  # exit-only: no step reported
    # configured: a script that saves in a readable layout is checked even when every save was refused
    assert d.final_step_to_check(False, True, 16, 6, None) == 6
    assert d.final_step_to_check(True, False, 16, 16, None) is None


@pytest.mark.parametrize(
    "nodelist,host",
    [
        ("gpu[007-012,20],cpu1", "gpu007"),
        ("n1,n2", "n1"),
        ("single", "single"),
        ("rack[2-3]-n[01-04]", "rack2-n01"),
        ("a[5]", "a5"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_a_slurm_nodelist_expands_in_order():
    assert expand_hostlist("gpu[007-009,20],cpu1") == ["gpu007", "gpu008", "gpu009", "gpu20", "cpu1"]
    assert expand_hostlist("rack[2-3]-n[01-02]") == ["rack2-n01", "rack2-n02", "rack3-n01", "rack3-n02"]
    with pytest.raises(ConfigError):
        expand_hostlist("n[3-1]")


def test_topology_from_slurm_environment():
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_NODEID": "2",
        "SLURM_NNODES": "4",
        "SLURM_JOB_NODELIST": "gpu[10-13]",
        "SLURMD_NODENAME": "gpu12",
    }
    topo = resolve_topology(env, node_rank=None, nnodes=None, master_addr=None, master_port=None, default_port=29400)
    assert (topo.slot, topo.slots, topo.hosts, topo.store_port, topo.node_name) == (
        2,
        4,
        ("gpu10", "gpu11", "gpu12", "gpu13"),
        29400,
        "gpu12",
    )
    assert topo.store_address(0, 0) == ("gpu10", 29400) and topo.store_address(1, 1) == ("gpu11", 29401)


def test_topology_flags_override_slurm():
    env = {"SLURM_JOB_ID": "7", "SLURM_NODEID": "2", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "gpu[10-13]"}
    topo = resolve_topology(env, node_rank=1, nnodes=2, master_addr="h0", master_port=1234, default_port=29400)
    assert (topo.slot, topo.slots, topo.hosts, topo.store_port) == (1, 2, ("h0", "h0"), 1234)
    topo = resolve_topology(
        env, node_rank=1, nnodes=2, master_addr=None, master_port=None, default_port=29400, hosts=["a", "b"]
    )
    assert topo.hosts == ("a", "b")


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"node_rank": 3, "nnodes": 2}, "not within"),
        ({"node_rank": 0, "nnodes": 2}, "--master-addr or --hosts is required"),
        ({"node_rank": 0, "nnodes": 2, "hosts": ["a"]}, "1 host"),
    ],
)
def test_topology_errors_are_config_errors(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_topology({}, master_addr=None, master_port=None, default_port=29400, **kwargs)
