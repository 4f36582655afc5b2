"""Acceptance against the real Megatron trainer: interrupted runs end bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from resilient.core.exit_codes import ExitCode
from tests.supervisor.harness import REPO, events, ranks_of, start, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 12
COMMON = [f"train.steps={STEPS}", "train.eval_every=0", "checkpoint.interval_steps=4", "metrics.port=0",
          "supervisor.termination_grace_s=3", "supervisor.backoff_initial_s=0.1",
          "supervisor.step_timeout_floor_s=6", "supervisor.step_timeout_factor=3",
          "supervisor.step_timeout_min_samples=3"]
CONFIG = REPO / "examples" / "tiny.yaml"


def _sets(extra=()):
    return [arg for item in [*COMMON, *extra] for arg in ("--set", item)]


def _run(run_dir: Path, log: Path, extra=()) -> subprocess.Popen:
    return start(["run", str(CONFIG), "--run-dir", str(run_dir), *_sets(extra)], log=log)


def digest(run_dir: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "resilient.cli", "ckpt", "digest", str(run_dir)], cwd=REPO,
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    assert out[:2] == ["step", str(STEPS)]
    return out[-1]


def trained(run_dir: Path, attempt: int, step: int):
    """Attempt `attempt` completed `step`, and a checkpoint was committed (so the restart really resumes)."""
    def probe():
        if not events(run_dir, "ckpt_save"):
            return False
        path = run_dir / "train_log.jsonl"
        if not path.exists():
            return False
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return any(r.get("attempt") == attempt and r.get("step", 0) >= step and "loss" in r for r in recs)
    return probe


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    base = tmp_path_factory.mktemp("ref")
    proc = _run(base / "run", base / "supervisor.log")
    assert proc.wait(600) == ExitCode.FINISHED
    return digest(base / "run")


def test_rank_sigkill_same_digest(tmp_path, reference):
    proc = _run(tmp_path / "run", tmp_path / "supervisor.log")
    wait_until(trained(tmp_path / "run", 0, 5), 400, "step 5")
    ranks_of(proc.pid)[1].send_signal(signal.SIGKILL)
    assert proc.wait(600) == ExitCode.FINISHED
    [failure] = events(tmp_path / "run", "failure")
    assert failure["kind"] == "rank_exit" and failure["rank"] == 1
    assert events(tmp_path / "run", "ckpt_load")  # the new attempt resumed from a checkpoint
    assert digest(tmp_path / "run") == reference


def test_rank_sigstop_hang_detected_same_digest(tmp_path, reference):
    proc = _run(tmp_path / "run", tmp_path / "supervisor.log")
    wait_until(trained(tmp_path / "run", 0, 6), 400, "step 6")
    stopped = time.time()
    ranks_of(proc.pid)[0].send_signal(signal.SIGSTOP)
    assert proc.wait(600) == ExitCode.FINISHED
    [failure] = events(tmp_path / "run", "failure")
    assert failure["kind"] == "hang" and failure["rank"] == 0
    timeout = float(re.search(r"timeout ([\d.]+)s", failure["reason"]).group(1))
    assert failure["ts"] - stopped <= timeout + 2.0
    assert digest(tmp_path / "run") == reference


def test_supervisor_sigterm_resumes_at_the_saved_step(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = _run(run_dir, tmp_path / "supervisor.log")
    wait_until(trained(run_dir, 0, 5), 400, "step 5")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(300) == ExitCode.PREEMPTED
    stopped_at = [e for e in events(run_dir, "preempted") if "node" in e][-1]["step"]
    assert [e["step"] for e in events(run_dir, "ckpt_save")][-1] == stopped_at
    proc = _run(run_dir, tmp_path / "supervisor.log")
    assert proc.wait(600) == ExitCode.FINISHED
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in log if r.get("attempt") == 1 and "loss" in r]
    assert resumed[0] == stopped_at + 1  # zero lost steps
    assert digest(run_dir) == reference


def test_supervisor_sigkill_leaves_no_rank(tmp_path):
    proc = _run(tmp_path / "run", tmp_path / "supervisor.log", extra=["train.steps=1000"])
    wait_until(lambda: len(ranks_of(proc.pid)) == 2, 60, "two ranks")
    wait_until(trained(tmp_path / "run", 0, 1), 400, "step 1")
    ranks = list(ranks_of(proc.pid).values())
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    _, alive = psutil.wait_procs(ranks, timeout=5)
    assert alive == []


def test_two_nodes_restart_together_same_digest(tmp_path, reference):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    sets = _sets(["nodes=2", "supervisor.nproc_per_node=1"])
    nodes = [start(["supervise", str(CONFIG), "--run-dir", str(run_dir), "--node-rank", str(n), "--nnodes", "2",
                    "--master-addr", "127.0.0.1", "--master-port", str(port), *sets],
                   # one intra-op thread per rank as in the reference run: CPU float sums depend on the thread count
                   env={"RESILIENT_NODE_NAME": f"node{n}", "OMP_NUM_THREADS": "1"},
                   log=tmp_path / f"node{n}.log") for n in (0, 1)]
    wait_until(trained(run_dir, 0, 5), 400, "step 5")
    ranks_of(nodes[1].pid)[1].send_signal(signal.SIGKILL)
    assert [p.wait(600) for p in nodes] == [ExitCode.FINISHED, ExitCode.FINISHED]
    [failure] = events(run_dir, "failure")
    assert (failure["kind"], failure["rank"], failure["node"]) == ("rank_exit", 1, 1)
    assert sorted((e["attempt"], e["node"]) for e in events(run_dir, "attempt_start")) == \
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert digest(run_dir) == reference
