"""Both supported megatron-core lines (0.16.1 and the current 0.19.x) run the trainer on a pipeline +
distributed-optimizer layout under the supervisor: a 0.19 run stopped and rerun ends on the bits of an
uninterrupted 0.16.1 run (the lines compute alike on CPU, so one reference serves both).
A 0.19 checkpoint keeps its common state inside the shards, which 0.16.1 refuses to load with one line.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from resilient.core.exit_codes import ExitCode
from tests.mcore import python_for
from tests.ranks import REPO, TINY, digest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

STEPS, STOP = 12, 5
SETS = [
    f"train.steps={STEPS}",
    "train.warmup_steps=2",
    "train.eval_every=0",
    "checkpoint.interval_steps=4",
    "parallel.pp=2",
    "parallel.distributed_optimizer=true",
    "supervisor.warm_spares=false",
    "metrics.port=0",
]


def _run(python: str, run_dir: Path, *extra: str) -> int:
    sets = [a for s in [*SETS, *extra] for a in ("--set", s)]
    out = subprocess.run(
        [python, "-m", "resilient.cli", "run", str(TINY), "--run-dir", str(run_dir), *sets],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
    )
    return out.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> str:
    run_dir = tmp_path_factory.mktemp("pp2-distopt") / "run"
    assert _run(python_for("0.16"), run_dir) == ExitCode.FINISHED
    return digest(run_dir)


def test_pp2_distributed_optimizer_stop_and_rerun_on_the_current_line_ends_on_the_0_16_bits(tmp_path, uninterrupted):
    # 0.16.1's own stop and rerun on this layout: test_layouts' chaos drill (a preemption and a killed rank)
    python = python_for("0.19")
    run_dir = tmp_path / "run"
    assert _run(python, run_dir, f"train.exit_at_step={STOP}") == ExitCode.PREEMPTED
    assert _run(python, run_dir) == ExitCode.FINISHED
    assert digest(run_dir, python=python) == uninterrupted


def test_a_current_line_checkpoint_is_refused_by_0_16_with_one_line(tmp_path):
    run_dir = tmp_path / "run"
    assert _run(python_for("0.19"), run_dir, "train.steps=4", "parallel.pp=1") == ExitCode.FINISHED
    out = subprocess.run(
        [
            python_for("0.16"),
            "-m",
            "resilient.cli",
            "run",
            str(TINY),
            "--run-dir",
            str(run_dir),
            *(a for s in [*SETS, "train.steps=8", "parallel.pp=1"] for a in ("--set", s)),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert out.returncode == ExitCode.CONFIG_ERROR, out.stderr[-2000:]
    assert "written by megatron-core >= 0.19" in out.stderr and "Traceback" not in out.stderr
