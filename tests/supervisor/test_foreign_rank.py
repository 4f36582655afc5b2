"""A script that knows nothing of resilient, supervised in exit_only mode: real processes, real signals."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import yaml

from resilient.core.exit_codes import ExitCode
from tests.supervisor.harness import events, ranks_of, start, wait_until
from trainer.megatron_lm import checkpoints as megatron_lm

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(__file__).with_name("plain_ddp_script.py")


def _config(path: Path, train_iters: int) -> Path:
    argv = [
        sys.executable,
        str(SCRIPT),
        "--save",
        "{run_dir}/save",
        "--train-iters",
        str(train_iters),
        "--save-interval",
        "5",
        "--log",
        "{run_dir}/iterations.jsonl",
    ]
    path.write_text(
        yaml.safe_dump(
            {
                "supervisor": {
                    "nproc_per_node": 2,
                    "rank_command": argv,
                    "rank_protocol": "exit_only",
                    "progress_dir": "save",
                    "backoff_initial_s": 0.1,
                    "termination_grace_s": 2.0,
                },
                "health": {"enabled": False},
                "metrics": {"enabled": False},
            }
        )
    )
    return path


def _iterations(run_dir: Path) -> list[dict]:
    path = run_dir / "iterations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _reached(run_dir: Path, n: int):
    return lambda: any(i["iteration"] >= n for i in _iterations(run_dir))


def test_sigkilled_rank_restarts_from_its_checkpoint_and_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        ["run", str(_config(tmp_path / "cfg.yaml", 30)), "--run-dir", str(run_dir)], log=tmp_path / "supervisor.log"
    )
    wait_until(_reached(run_dir, 7), 90, "iteration 7 (after the first save)")
    ranks_of(proc.pid)[1].send_signal(signal.SIGKILL)
    assert proc.wait(120) == ExitCode.FINISHED, (tmp_path / "supervisor.log").read_text()[-2000:]
    [failure] = events(run_dir, "failure")
    assert failure["kind"] == "rank_exit" and failure["rank"] == 1 and "SIGKILL" in failure["reason"]
    done = _iterations(run_dir)
    assert {i["iteration"] for i in done} == set(range(1, 31))  # every iteration done
    resumed = sorted({i["resumed_from"] for i in done})
    assert resumed[0] == 0 and len(resumed) == 2 and resumed[1] >= 5 and resumed[1] % 5 == 0
    assert megatron_lm.read_tracker(run_dir / "save") == 30 and megatron_lm.tracker_problem(run_dir / "save") is None


def test_preemption_saves_exits_75_and_a_rerun_finishes(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        ["run", str(_config(tmp_path / "cfg.yaml", 100000)), "--run-dir", str(run_dir)], log=tmp_path / "supervisor.log"
    )
    wait_until(_reached(run_dir, 3), 90, "iteration 3")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == ExitCode.PREEMPTED
    saved = megatron_lm.read_tracker(run_dir / "save")
    assert saved == max(i["iteration"] for i in _iterations(run_dir))  # the script saved where it stopped
    assert [e["event"] for e in events(run_dir, "failure")] == []

    proc = start(
        ["run", str(_config(tmp_path / "cfg2.yaml", saved + 4)), "--run-dir", str(run_dir)],
        log=tmp_path / "supervisor.log",
    )
    assert proc.wait(90) == ExitCode.FINISHED
    rerun = [i["iteration"] for i in _iterations(run_dir) if i["resumed_from"] == saved]
    assert rerun == list(range(saved + 1, saved + 5))
