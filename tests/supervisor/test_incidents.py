"""Hang and crash evidence: real ranks, real py-spy, real signals; the culprit rules on their own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resilient.supervisor import incidents
from resilient.supervisor.incidents_culprit import RankEvidence, find_culprit
from resilient.supervisor.incidents_stacks import Frame, last_traceback_frame, parse_pyspy
from resilient.supervisor.ranks import free_port
from tests.ranks import resilient_cli
from tests.supervisor.harness import REPO, events, ranks_of, start, start_nodes, wait_until, write_config

pytestmark = pytest.mark.timeout(120)

STUCK_RANK = Path(__file__).with_name("stuck_rank.py")
_ALL_REDUCE = (Frame("all_reduce", "torch/distributed/distributed_c10d.py", 2800), Frame("train", "train.py", 10))
_SLEEP = (Frame("forward", "train.py", 5), Frame("train", "train.py", 9))


# -- the rules, without processes ---------------------------------------------------------------------


def test_stopped_process_is_blamed_first():
    c = find_culprit([RankEvidence(0, "sleeping", 7, _SLEEP), RankEvidence(3, "stopped", 9, _ALL_REDUCE)])
    assert (c.rank, c.frame) == (3, str(_ALL_REDUCE[0])) and "stopped" in c.reason


def test_rank_outside_the_collective_is_blamed():
    c = find_culprit(
        [
            RankEvidence(0, "sleeping", 5, _ALL_REDUCE),
            RankEvidence(1, "sleeping", 5, _SLEEP),
            RankEvidence(2, "sleeping", 4, _ALL_REDUCE),
        ]
    )
    assert (c.rank, c.frame) == (1, "forward (train.py:5)") and "0, 2 wait" in c.reason


def test_lowest_step_when_stacks_do_not_tell():
    c = find_culprit(
        [
            RankEvidence(0, "sleeping", 5, _ALL_REDUCE),
            RankEvidence(1, "sleeping", 4, _ALL_REDUCE),
            RankEvidence(2, "running", None, ()),
        ]
    )
    assert c.rank == 2 and "lowest step" in c.reason  # no step known: the rank that never got going


def test_threading_wait_is_not_a_collective_and_tracebacks_are_read():
    threads = parse_pyspy(
        'Process 1: python x.py\n\nThread 0x7F (idle): "MainThread"\n'
        "    wait (threading.py:327)\n    get (queue.py:171)\n    main (x.py:3)\n"
        'Thread 12 (active): "hb"\n    run (hb.py:1)\n'
    )
    assert [t.name for t in threads] == ["MainThread", "hb"] and not any(f.in_collective for f in threads[0].frames)
    tb = [
        "Traceback (most recent call last):",
        '  File "/a/loop.py", line 9, in train',
        '  File "/a/model.py", line 3, in forward',
        "RuntimeError: CUDA error",
    ]
    assert last_traceback_frame(tb) == Frame("forward", "/a/model.py", 3)


# -- real hung ranks ----------------------------------------------------------------------------------


def _stuck_job(tmp_path: Path, mode: str) -> list[subprocess.Popen]:
    port, ready = free_port(), tmp_path / mode
    ready.mkdir()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "READY_DIR": str(ready),
            "STUCK_MODE": mode,
            "OMP_NUM_THREADS": "1",
        }
        procs.append(subprocess.Popen([sys.executable, str(STUCK_RANK)], env=env, cwd=REPO))
    return procs


@pytest.mark.timeout(300)  # four torch imports: slow on a busy machine
def test_hung_jobs_name_the_rank_outside_the_collective(tmp_path):
    """Both hangs at once (their torch imports overlap): a rank asleep in its forward pass, a rank that
    skipped the all_reduce and stalls on data; the peer waits in all_reduce each time."""
    jobs = {mode: _stuck_job(tmp_path, mode) for mode in ("sleep", "skip")}
    try:
        wait_until(
            lambda: all((tmp_path / m / f"rank{r}").exists() for m in jobs for r in range(2)), 240, "all ranks stuck"
        )
        time.sleep(0.5)  # rank 0 from its marker into all_reduce
        rels = {
            mode: incidents.capture(
                tmp_path / mode,
                0,
                "hang",
                0,
                "test",
                [incidents.Target(r, p.pid, 3, None, None) for r, p in enumerate(procs)],
            )
            for mode, procs in jobs.items()
        }
        # rank 0 giving up in its all_reduce is the same hang, found by gloo: the same evidence
        gloo = "rank 0 reported an error: RuntimeError: [unbound_buffer.cc:78] Timed out waiting 600000ms for recv"
        waited = incidents.capture(
            tmp_path / "skip",
            1,
            "rank_error",
            0,
            gloo,
            [incidents.Target(r, p.pid, 3, None, None) for r, p in enumerate(jobs["skip"])],
        )
    finally:
        for p in (p for procs in jobs.values() for p in procs):
            p.kill()
            p.wait()
    for mode, frame, deeper in (
        ("sleep", "forward (tests/supervisor/stuck_rank.py", "main"),
        ("skip", "Condition.wait (threading.py", "next_batch"),
    ):
        where = tmp_path / mode / rels[mode]
        summary = json.loads((where / "summary.json").read_text())
        assert summary["culprit"]["rank"] == 1 and summary["culprit"]["frame"].startswith(frame), summary
        r0, r1 = summary["ranks"]
        assert r0["in_collective"] and "all_reduce" in (where / "rank0.txt").read_text()
        assert not r1["in_collective"] and any(deeper in f for f in r1["stack"])
        assert "culprit: rank 1" in (where / "summary.txt").read_text()
    summary = json.loads((tmp_path / "skip" / waited / "summary.json").read_text())
    assert (waited, summary["kind"], summary["culprit"]["rank"]) == ("incidents/1-rank_error", "rank_error", 1), summary
    assert [r["in_collective"] for r in summary["ranks"]] == [True, False] and summary["exit"]["rank"] == 0
    assert {"rank0.txt", "rank1.txt", "rank0.log.txt"} <= {p.name for p in (tmp_path / "skip" / waited).iterdir()}


def test_a_collective_timeout_is_told_from_other_errors():
    assert incidents.collective_timeout("RuntimeError: [unbound_buffer.cc:78] Timed out waiting 600000ms for recv")
    assert incidents.collective_timeout("[Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9)")
    assert not incidents.collective_timeout("rank 1 reported an error: injected error")


# -- through the supervisor ---------------------------------------------------------------------------


def _supervise(tmp_path, sup, env=None):
    cfg = write_config(tmp_path / "cfg.yaml", steps=1000, supervisor={"max_restarts": 0, **sup}, health=False)
    run_dir = tmp_path / "run"
    return start(["run", str(cfg), "--run-dir", str(run_dir)], env=env, log=tmp_path / "sup.log"), run_dir


def _rank_step(run_dir: Path, rank: int) -> int:
    try:
        ranks = json.loads((run_dir / "status.json").read_text())["ranks"]
    except (OSError, ValueError, KeyError):
        return -1
    return next((r["step"] or -1 for r in ranks if r["rank"] == rank), -1)


def test_sigstop_hang_records_an_incident_naming_the_stopped_rank_from_every_nodes_stacks(tmp_path):
    """Two supervisors as two nodes: node 1 declares the hang of its SIGSTOPped rank; node 0 adds its
    rank's stack when it sees the restart request; the summary is built from both nodes' evidence and
    `resilient status` names it."""
    sup = {"max_restarts": 0, "step_timeout_floor_s": 1.5, "step_timeout_factor": 3.0, "step_timeout_min_samples": 3}
    cfg = write_config(tmp_path / "cfg.yaml", steps=5000, nodes=2, nproc=1, supervisor=sup, health=False)
    run_dir, port = tmp_path / "run", free_port()
    nodes = start_nodes(cfg, run_dir, port, tmp_path, name="fake", env={"FAKE_STEP_S": "0.05"})
    try:
        wait_until(lambda: _rank_step(run_dir, 1) >= 3, 90, "rank 1 stepping")  # past init: the step timeout applies
        ranks_of(nodes[1].pid)[1].send_signal(signal.SIGSTOP)
        for p in nodes:
            p.wait(60)
    finally:
        for p in nodes:
            p.kill()
    [failure] = events(run_dir, "failure")
    summary = json.loads((run_dir / failure["incident"] / "summary.json").read_text())
    assert (failure["node"], summary["nodes"], summary["culprit"]["rank"]) == (1, [0, 1], 1), summary
    assert failure["kind"] == "hang" and failure["incident"] == "incidents/0-hang"
    assert "stopped" in summary["culprit"]["reason"] and "fake_rank.py" in summary["culprit"]["frame"]
    assert {"rank0.txt", "rank1.txt", "node0.json", "node1.json", "summary.txt"} <= {
        p.name for p in (run_dir / failure["incident"]).iterdir()
    }
    shown = resilient_cli("status", str(run_dir), env={"COLUMNS": "200"})
    assert "incidents/0-hang" in shown.stdout and "culprit rank 1" in shown.stdout, shown.stdout


def test_crash_records_exit_code_and_log_tail(tmp_path):
    proc, run_dir = _supervise(tmp_path, {}, env={"FAKE_CRASH": "every:2"})
    assert proc.wait(60) != 0
    [failure] = events(run_dir, "failure")
    summary = json.loads((run_dir / failure["incident"] / "summary.json").read_text())
    assert failure["incident"] == "incidents/0-rank_exit" and summary["exit"]["code"] == 3
    assert summary["culprit"]["rank"] == failure["rank"]
    assert (run_dir / failure["incident"] / f"rank{failure['rank']}.txt").exists()
