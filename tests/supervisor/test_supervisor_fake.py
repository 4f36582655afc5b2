"""The supervisor against a fake rank: real processes, real signals, real TCPStore coordination."""

from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from resilient.slurm.config import SlurmConfig
from resilient.slurm.policy import Action, decide_requeue, job_end_from_ledger
from resilient.supervisor.ranks import free_port
from tests.supervisor.harness import (
    events,
    hang_step_timeout,
    ranks_of,
    start,
    start_nodes,
    steps_done,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.timeout(120)


def _run(tmp_path, cfg_kwargs=None, env=None, args=()):
    cfg = write_config(tmp_path / "cfg.yaml", **(cfg_kwargs or {}))
    run_dir = tmp_path / "run"
    proc = start(["run", str(cfg), "--run-dir", str(run_dir), *args], env=env, log=tmp_path / "supervisor.log")
    return proc, run_dir


def _progress(run_dir, attempt, step):
    return lambda: any(s["attempt"] == attempt and s["step"] >= step for s in steps_done(run_dir))


def _assert_all_steps_done(run_dir, steps):
    assert {s["step"] for s in steps_done(run_dir)} == set(range(1, steps + 1))
    assert json.loads((run_dir / "fake_ckpt.json").read_text())["step"] == steps


def test_rank_sigkill_restarts_and_finishes(tmp_path):
    proc, run_dir = _run(tmp_path, {"steps": 30})
    wait_until(_progress(run_dir, 0, 5), 60, "attempt 0 at step 5")
    ranks_of(proc.pid)[1].send_signal(signal.SIGKILL)
    assert proc.wait(90) == ExitCode.FINISHED
    [failure] = events(run_dir, "failure")
    assert failure["kind"] == "rank_exit" and failure["rank"] == 1 and "SIGKILL" in failure["reason"]
    assert failure["latency_seconds"] == 0  # decided in the poll that reaped the rank, not at a later one
    assert [e["attempt"] for e in events(run_dir, "restart")] == [1]
    assert [e["attempt"] for e in events(run_dir, "attempt_start")] == [0, 1]
    _assert_all_steps_done(run_dir, 30)
    assert events(run_dir, "finished")[0]["step"] == 30
    assert (run_dir / "logs" / "attempt1.node0.rank1.log").exists()


def test_sigstop_is_detected_as_a_hang_within_timeout(tmp_path):
    sup = {"step_timeout_floor_s": 1.5, "step_timeout_factor": 3.0, "step_timeout_min_samples": 3}
    proc, run_dir = _run(tmp_path, {"steps": 40, "supervisor": sup})
    wait_until(_progress(run_dir, 0, 8), 60, "attempt 0 at step 8")
    stopped_at = time.time()
    ranks_of(proc.pid)[0].send_signal(signal.SIGSTOP)
    assert proc.wait(90) == ExitCode.FINISHED
    [failure] = events(run_dir, "failure")
    assert failure["kind"] == "hang" and failure["rank"] == 0 and "step timeout" in failure["reason"]
    # declared after the stop, under the step timeout calibrated from the steps seen (at least the floor),
    # not the 20 s initial one
    assert failure["ts"] > stopped_at and 1.5 <= hang_step_timeout(failure) < 20.0, failure
    _assert_all_steps_done(run_dir, 40)


def test_rank_error_report_restarts(tmp_path):
    proc, run_dir = _run(tmp_path, {"steps": 12}, env={"FAKE_ERROR_AT": "4"})
    assert proc.wait(90) == ExitCode.FINISHED
    [failure] = events(run_dir, "failure")
    assert failure["kind"] == "rank_error" and "injected error" in failure["reason"]
    _assert_all_steps_done(run_dir, 12)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_supervisor_signal_preempts_and_rerun_resumes_at_that_step(tmp_path, sig):
    # one rank: fake ranks share no collective, so of two one may be a step ahead when the stop arrives
    proc, run_dir = _run(tmp_path, {"steps": 200, "nproc": 1}, env={"FAKE_CKPT_EVERY": "1000"})
    wait_until(_progress(run_dir, 0, 6), 60, "attempt 0 at step 6")
    proc.send_signal(sig)
    assert proc.wait(60) == ExitCode.PREEMPTED
    saved = json.loads((run_dir / "fake_ckpt.json").read_text())["step"]
    assert saved == max(s["step"] for s in steps_done(run_dir))  # the step it stopped at was saved
    assert events(run_dir, "preempted")[0]["step"] == saved
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted"

    proc = start(
        ["run", str(tmp_path / "cfg.yaml"), "--run-dir", str(run_dir), "--set", "train.steps=" + str(saved + 5)],
        env={"FAKE_CKPT_EVERY": "1000"},
        log=tmp_path / "supervisor.log",
    )
    assert proc.wait(60) == ExitCode.FINISHED
    resumed = [s["step"] for s in steps_done(run_dir) if s["attempt"] == 1]
    assert resumed == list(range(saved + 1, saved + 6))  # zero lost steps, none repeated
    assert [e["attempt"] for e in events(run_dir, "run_start")] == [0, 1]


def test_ranks_ignoring_the_stop_request_are_killed_after_the_grace(tmp_path):
    proc, run_dir = _run(
        tmp_path, {"steps": 1000, "supervisor": {"preempt_grace_s": 2.0}}, env={"FAKE_IGNORE_STOP": "1"}
    )
    wait_until(_progress(run_dir, 0, 2), 60, "attempt 0 at step 2")
    ranks = list(ranks_of(proc.pid).values())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == ExitCode.PREEMPTED
    # the supervisor itself ended the grace and killed the ranks (they never stop on their own)
    said = (tmp_path / "supervisor.log").read_text()
    assert "node 0: ranks [0, 1] did not stop within 2s of the stop request; killing them" in said
    assert psutil.wait_procs(ranks, timeout=1)[1] == []


def test_supervisor_sigkill_leaves_no_rank_behind(tmp_path):
    proc, run_dir = _run(tmp_path, {"steps": 1000})
    wait_until(_progress(run_dir, 0, 2), 60, "attempt 0 at step 2")
    ranks = list(ranks_of(proc.pid).values())
    assert len(ranks) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    gone, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == [] and len(gone) == 2


def test_restart_budget_exhausted_exit_code(tmp_path):
    proc, run_dir = _run(tmp_path, {"steps": 100, "supervisor": {"max_restarts": 2}}, env={"FAKE_CRASH": "every:2"})
    assert proc.wait(90) == ExitCode.RESTART_BUDGET_EXHAUSTED
    assert len(events(run_dir, "failure")) == 3 and len(events(run_dir, "restart")) == 2
    [gave_up] = events(run_dir, "gave_up")
    assert gave_up["exit_code"] == ExitCode.RESTART_BUDGET_EXHAUSTED and "budget" in gave_up["reason"]


def test_no_progress_loop_exit_code(tmp_path):
    sup = {"max_restarts": 10, "max_attempts_without_progress": 2}
    proc, run_dir = _run(tmp_path, {"steps": 100, "supervisor": sup}, env={"FAKE_CRASH": "init"})
    assert proc.wait(90) == ExitCode.NO_PROGRESS
    assert len(events(run_dir, "attempt_start")) == 2
    [gave_up] = events(run_dir, "gave_up")
    assert gave_up["exit_code"] == ExitCode.NO_PROGRESS and "no progress" in gave_up["reason"]


def test_two_supervisors_as_two_nodes_restart_together(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", steps=30, nodes=2, nproc=1)
    run_dir, port = tmp_path / "run", free_port()
    nodes = start_nodes(cfg, run_dir, port, tmp_path, name="fake")
    wait_until(_progress(run_dir, 0, 5), 60, "attempt 0 at step 5")
    wait_until(lambda: 1 in ranks_of(nodes[1].pid), 10, "rank 1 under node 1")
    ranks_of(nodes[1].pid)[1].send_signal(signal.SIGKILL)
    assert [p.wait(90) for p in nodes] == [ExitCode.FINISHED, ExitCode.FINISHED]
    [failure] = events(run_dir, "failure")
    assert (failure["kind"], failure["rank"], failure["node"]) == ("rank_exit", 1, 1)
    starts = sorted((e["attempt"], e["node"]) for e in events(run_dir, "attempt_start"))
    assert starts == [(0, 0), (0, 1), (1, 0), (1, 1)]
    _assert_all_steps_done(run_dir, 30)
    status = json.loads((run_dir / "status.json").read_text())
    assert {r["node_name"] for r in status["ranks"]} == {"fake0", "fake1"}


def test_status_command_renders_a_run(tmp_path):
    proc, run_dir = _run(tmp_path, {"steps": 3})
    assert proc.wait(60) == ExitCode.FINISHED
    shown = start(["status", str(run_dir), "--json"], log=tmp_path / "status.out")
    assert shown.wait(30) == 0
    out = (tmp_path / "status.out").read_text()
    data = json.loads(out)
    assert data["state"] == "finished" and data["step"] == 3 and len(data["ranks"]) == 2
    assert os.stat(run_dir / "config.yaml").st_mode & 0o777 == 0o600


def test_node_count_mismatch_is_a_config_error(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", nodes=2)
    proc = start(["run", str(cfg), "--run-dir", str(tmp_path / "run")], log=tmp_path / "err.log")
    assert proc.wait(30) == ExitCode.CONFIG_ERROR
    assert "nodes" in (tmp_path / "err.log").read_text()


def test_fatal_health_during_training_ends_unhealthy_naming_the_node(tmp_path):
    nvml = tmp_path / "nvml"
    nvml.mkdir()
    state = nvml / "gpunode7.json"
    state.write_text(json.dumps({"available": True, "device_count": 1, "devices": [{"index": 0}]}))
    cfg = write_config(tmp_path / "cfg.yaml", steps=1000)
    run_dir = tmp_path / "run"
    proc = start(
        [
            "run",
            str(cfg),
            "--run-dir",
            str(run_dir),
            "--set",
            f"health.fake_nvml_dir={nvml}",
            "--set",
            "health.monitor_interval_s=0.5",
        ],
        env={"RESILIENT_NODE_NAME": "gpunode7"},
        log=tmp_path / "supervisor.log",
    )
    wait_until(_progress(run_dir, 0, 3), 60, "attempt 0 at step 3")
    state.write_text(json.dumps({"available": True, "device_count": 1, "devices": [{"index": 0, "xids": [79]}]}))
    assert proc.wait(60) == ExitCode.UNHEALTHY_NODE
    kinds = [f["kind"] for f in events(run_dir, "failure")]
    assert kinds[0] == "health"
    [gave_up] = events(run_dir, "gave_up")
    assert gave_up["exit_code"] == ExitCode.UNHEALTHY_NODE and "gpunode7" in gave_up["reason"]
    assert "79" in gave_up["reason"]
    assert len(events(run_dir, "attempt_start")) == 1  # the pre-flight kept the ranks from respawning


@pytest.mark.parametrize("how", ["exit", "error heartbeat"])
def test_a_rank_exiting_unhealthy_node_condemns_its_node_and_the_job_is_requeued_without_it(tmp_path, how):
    verdict = (
        {"FAKE_CRASH": "every:3", "FAKE_CRASH_CODE": "76"}
        if how == "exit"
        else {"FAKE_ERROR_AT": "3", "FAKE_ERROR_CODE": "76"}
    )
    proc, run_dir = _run(tmp_path, {"steps": 30}, env={**verdict, "RESILIENT_NODE_NAME": "badnode"})
    assert proc.wait(90) == ExitCode.UNHEALTHY_NODE
    assert len(events(run_dir, "attempt_start")) == 1  # no restart on a condemned node
    [failure] = events(run_dir, "failure")
    assert failure["kind"] == ("rank_exit" if how == "exit" else "rank_error")
    [gave_up] = events(run_dir, "gave_up")
    assert gave_up["exit_code"] == ExitCode.UNHEALTHY_NODE and "node badnode" in gave_up["reason"]
    assert "UNHEALTHY_NODE" in gave_up["reason"] and failure["reason"] in gave_up["reason"]
    [health] = events(run_dir, "health")
    assert (health["node"], health["severity"], health["check"]) == ("badnode", "fatal", "rank.exit")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "unhealthy"
    # what `resilient slurm on-exit` does with this run's ledger: requeue without the node
    end = job_end_from_ledger(ledger.read(run_dir), exit_code=int(ExitCode.UNHEALTHY_NODE), since=0, nodes=1)
    action, why = decide_requeue(end, SlurmConfig())
    assert action.action is Action.REQUEUE and action.exclude == ("badnode",) and "badnode" in why
