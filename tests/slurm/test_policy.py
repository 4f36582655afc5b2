"""The exit-code -> scheduler-action policy, without Slurm."""

from resilient.core.exit_codes import ExitCode
from resilient.slurm.config import SlurmConfig
from resilient.slurm.policy import Action, Cause, GaveUp, JobEnd, decide_requeue, job_end_from_ledger, job_ref


def end(code, *gave_up, nodes=2, crashes=0):
    return JobEnd(exit_code=int(code), gave_up=tuple(gave_up), nodes=nodes, crash_requeues=crashes)


def test_finished_is_final():
    d, reason = decide_requeue(end(ExitCode.FINISHED), SlurmConfig())
    assert d.action is Action.FINISHED and reason == "run finished"


def test_preempted_requeues_without_changes():
    d, reason = decide_requeue(end(ExitCode.PREEMPTED), SlurmConfig())
    assert (d.action, d.cause, d.exclude, d.nodes) == (Action.REQUEUE, Cause.PREEMPTED, (), None)
    assert "preempted" in reason


def test_unhealthy_node_is_excluded_and_drained_when_allowed():
    bad = GaveUp(int(ExitCode.UNHEALTHY_NODE), "n1", "n1: gpu xid 79")
    d, reason = decide_requeue(end(ExitCode.UNHEALTHY_NODE, bad), SlurmConfig())
    assert (d.action, d.cause, d.exclude, d.drain, d.nodes) == (Action.REQUEUE, Cause.UNHEALTHY, ("n1",), (), None)
    assert "n1" in reason
    d, _ = decide_requeue(end(ExitCode.UNHEALTHY_NODE, bad), SlurmConfig(drain_bad_nodes=True))
    assert d.drain == ("n1",)


def test_unhealthy_node_shrinks_the_job_down_to_min_nodes_only():
    bad = [GaveUp(int(ExitCode.UNHEALTHY_NODE), n, "") for n in ("n1", "n2", "n3")]
    d, reason = decide_requeue(end(ExitCode.UNHEALTHY_NODE, *bad, nodes=4), SlurmConfig(min_nodes=2))
    assert d.exclude == ("n1", "n2", "n3") and d.nodes == 2 and "2 node(s)" in reason
    d, _ = decide_requeue(end(ExitCode.UNHEALTHY_NODE, bad[0], nodes=4), SlurmConfig(min_nodes=2))
    assert d.nodes == 3


def test_code_a_requeue_cannot_fix_wins_over_preemption_and_bad_nodes():
    for code in (
        ExitCode.CONFIG_ERROR,
        ExitCode.RESTART_BUDGET_EXHAUSTED,
        ExitCode.NO_PROGRESS,
        ExitCode.CHECKPOINT_DAMAGED,
    ):
        records = (GaveUp(int(code), None, "why not"), GaveUp(int(ExitCode.UNHEALTHY_NODE), "n1", ""))
        d, reason = decide_requeue(end(ExitCode.PREEMPTED, *records), SlurmConfig())
        assert d.action is Action.STOP, code
        assert "why not" in reason and "not requeued" in reason


def test_bad_node_wins_over_preemption_even_when_srun_reports_less():
    # srun returns the highest code; a supervisor's gave_up record still counts.
    d, _ = decide_requeue(end(ExitCode.PREEMPTED, GaveUp(int(ExitCode.UNHEALTHY_NODE), "n0", "")), SlurmConfig())
    assert d.exclude == ("n0",)


def test_crashes_requeue_until_the_budget_is_spent():
    cfg = SlurmConfig(max_crash_requeues=2)
    d, reason = decide_requeue(end(137, crashes=1), cfg)
    assert (d.action, d.cause) == (Action.REQUEUE, Cause.CRASH) and "signal" in reason and "2 of 2" in reason
    d, reason = decide_requeue(end(ExitCode.RANK_FAILED, crashes=2), cfg)
    assert d.action is Action.STOP and "RANK_FAILED" in reason


def test_unhealthy_code_without_a_node_is_a_bounded_crash_requeue():
    d, reason = decide_requeue(end(ExitCode.UNHEALTHY_NODE), SlurmConfig(max_crash_requeues=0))
    assert d.action is Action.STOP and "not named" in reason


def test_ledger_reading_keeps_this_allocation_and_counts_crash_requeues():
    records = [
        {"ts": 10, "event": "gave_up", "exit_code": 76, "node": "n0", "reason": "old allocation"},
        {"ts": 11, "event": "requeue", "cause": "crash"},
        {"ts": 12, "event": "requeue", "cause": "preempted"},
        {"ts": 20, "event": "gave_up", "exit_code": 76, "node": "n1", "reason": "xid"},
        {"ts": 21, "event": "gave_up", "exit_code": "garbage"},
    ]
    e = job_end_from_ledger(records, exit_code=76, since=20, nodes=2)
    assert e.gave_up == (GaveUp(76, "n1", "xid"),) and e.crash_requeues == 1 and e.nodes == 2


def test_job_ref_is_array_aware():
    assert job_ref({"SLURM_JOB_ID": "7"}) == "7"
    assert job_ref({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "2"}) == "7_2"


def test_bad_node_falls_back_to_the_fatal_health_record():
    e = job_end_from_ledger(
        [
            {"ts": 5, "event": "health", "node": "n0", "severity": "warn"},
            {"ts": 6, "event": "health", "node": "n1", "severity": "fatal"},
            {"ts": 7, "event": "gave_up", "exit_code": 76, "reason": "node 1 unhealthy"},
        ],
        exit_code=76,
        since=0,
        nodes=2,
    )
    d, reason = decide_requeue(e, SlurmConfig(min_nodes=1))
    assert (d.exclude, d.nodes) == (("n1",), 1) and "1 node(s) from now on" in reason


def test_stragglers_are_excluded_only_when_health_says_so():
    e = end(ExitCode.PREEMPTED, nodes=4)
    e = JobEnd(e.exit_code, e.gave_up, e.nodes, 0, straggler_nodes=("n3", "n3"))
    assert decide_requeue(e, SlurmConfig())[0].exclude == ()
    d, reason = decide_requeue(e, SlurmConfig(), exclude_stragglers=True)
    assert d.exclude == ("n3",) and d.nodes is None and "straggler" in reason


# -- spare nodes, the coordinator's recorded outcome, the bad-node ledger --------------------


def test_the_coordinators_recorded_outcome_is_the_runs_whatever_srun_says_of_a_fenced_node():
    records = [
        {"ts": 20, "event": "bad_node", "node": "n1", "kind": "unhealthy", "reason": "xid 79"},
        {"ts": 21, "event": "bad_node", "node": "n0", "kind": "lost", "reason": "lease"},
        {"ts": 30, "event": "gave_up", "exit_code": 76, "node": "n0", "reason": "minority", "epoch": 0},
        {"ts": 40, "event": "finished", "step": 24, "epoch": 1},
    ]
    e = job_end_from_ledger(records, exit_code=137, since=10, nodes=3, spares=1)  # srun: n0's supervisor killed
    assert (e.outcome_code, e.unhealthy_nodes, e.repeat_bad_nodes) == (0, ("n1",), ())
    d, reason = decide_requeue(e, SlurmConfig(drain_bad_nodes=True))
    assert d.action is Action.FINISHED and d.drain == ("n1",) and "replaced in-job: n1" in reason


def test_a_node_out_twice_is_never_taken_back_and_replaced_unhealthy_nodes_stay_out():
    records = [
        {"ts": 1, "event": "bad_node", "node": "n2", "kind": "lost"},
        {"ts": 2, "event": "requeue", "cause": "preempted"},
        {"ts": 11, "event": "bad_node", "node": "n2", "kind": "lost"},
        {"ts": 12, "event": "bad_node", "node": "n1", "kind": "unhealthy"},
        {"ts": 13, "event": "preempted", "step": 9, "epoch": 0},
    ]
    e = job_end_from_ledger(records, exit_code=75, since=10, nodes=4, spares=2)
    d, reason = decide_requeue(e, SlurmConfig())
    assert d.cause is Cause.PREEMPTED and d.exclude == ("n1", "n2") and "n2 failed twice" in reason
    assert (d.nodes, d.spares) == (2, 0)  # ...and the smaller allocation gives up its spares first


def test_a_smaller_allocation_gives_up_spares_before_training_nodes():
    bad = [GaveUp(int(ExitCode.UNHEALTHY_NODE), "n2", "xid")]
    e = JobEnd(
        int(ExitCode.UNHEALTHY_NODE), tuple(bad), nodes=3, crash_requeues=0, spares=1, unhealthy_nodes=("n1",)
    )  # n1 replaced by the spare n2, then n2 failed with no spare left
    d, reason = decide_requeue(e, SlurmConfig())
    assert d.exclude == ("n1", "n2") and (d.nodes, d.spares) == (2, 0) and "2 node(s) from now on (0 spare)" in reason
    d, _ = decide_requeue(e, SlurmConfig(min_nodes=1))
    assert (d.nodes, d.spares) == (1, 0)


def test_a_requeue_slurm_did_itself_is_recorded_at_the_next_start():
    from resilient.slurm.policy import unrecorded_requeue

    records = [
        {"ts": 1, "event": "run_start", "slurm_job_id": "7", "slurm_restart_count": 0, "slot": 0, "host": "n0"},
        {"ts": 1, "event": "run_start", "slurm_job_id": "7", "slurm_restart_count": 0, "slot": 1, "host": "n1"},
        {"ts": 5, "event": "bad_node", "node": "n0", "kind": "lost"},
    ]  # the survivors saw n0 go
    got = unrecorded_requeue(records, 1, "7")
    assert got["cause"] == "slurm" and got["lost_batch_host"] == "n0" and got["slurm_restart_count"] == 0
    assert "batch host n0 lost" in got["reason"] and "nodes out before: n0" in got["reason"]
    assert unrecorded_requeue(records + [{"ts": 9, "event": "requeue", "cause": "preempted"}], 1, "7") is None
    assert unrecorded_requeue(records, 0, "7") is None and unrecorded_requeue(records, 1, "8") is None


def test_a_cancelled_job_is_not_requeued_though_its_supervisors_saved_as_for_a_preemption():
    d, reason = decide_requeue(JobEnd(int(ExitCode.PREEMPTED), (), 2, 0, cancelled=True), SlurmConfig())
    assert d.action is Action.STOP and "cancelled" in reason
    d, _ = decide_requeue(JobEnd(int(ExitCode.FINISHED), (), 2, 0, cancelled=True), SlurmConfig())
    assert d.action is Action.FINISHED  # it finished before the cancel took effect


def test_a_job_completing_well_before_its_time_limit_is_being_cancelled():
    from resilient.slurm.jobs import cancelled_by_operator

    assert cancelled_by_operator({"JobState": "COMPLETING", "RunTime": "00:00:08", "TimeLimit": "00:15:00"})
    assert cancelled_by_operator({"JobState": "CANCELLED"})
    assert not cancelled_by_operator({"JobState": "COMPLETING", "RunTime": "23:59:00", "TimeLimit": "1-00:00:00"})
    assert not cancelled_by_operator({"JobState": "RUNNING", "RunTime": "00:00:08", "TimeLimit": "00:15:00"})
