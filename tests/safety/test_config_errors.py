"""Configuration errors end a run at once: range checks before any rank starts, a rank's CONFIG_ERROR
is not retried, and a rerun never overwrites the recorded config with one the checkpoints contradict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from resilient.config import load_config
from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir
from tests.supervisor.harness import REPO, events, write_config
from trainer.checkpoint import ondisk

pytestmark = pytest.mark.timeout(300)


def _cli(*args, timeout=280):
    return subprocess.run(
        [sys.executable, "-m", "resilient.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "override,names",
    [
        ("train.lr=.inf", "train.lr: Input should be a finite number"),
        ("model.overrides.hidden_size=-5", "hidden_size: Input should be greater"),
    ],
)
def test_out_of_range_fields_are_refused_before_any_rank_starts(tmp_path, override, names):
    out = _cli("run", "examples/tiny.yaml", "--run-dir", str(tmp_path / "run"), "--set", override)
    assert out.returncode == ExitCode.CONFIG_ERROR and names in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_rank_config_error_ends_the_run_at_once(tmp_path):
    empty = tmp_path / "no_shards"
    empty.mkdir()
    run_dir = tmp_path / "run"
    out = _cli(
        "run",
        "examples/tiny.yaml",
        "--run-dir",
        str(run_dir),
        "--set",
        f"data.path={empty}",
        "--set",
        "data.cache_dir=" + str(tmp_path / "cache"),
        "--set",
        "health.enabled=false",
    )
    assert out.returncode == ExitCode.CONFIG_ERROR, out.stderr[-3000:]
    assert [e["attempt"] for e in events(run_dir, "attempt_start")] == [0]  # not retried
    assert not events(run_dir, "restart")
    assert "not retried" in out.stderr


def test_rerun_with_another_model_keeps_the_recorded_config(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", steps=4)
    run_dir = tmp_path / "run"
    arch = load_config(cfg).model.architecture().model_dump(exclude={"published_params"})
    step = ondisk.step_dir(RunDir(run_dir).checkpoints, 4)
    step.mkdir(parents=True)
    (step / ondisk.MARKER).write_text(json.dumps({"files": {}, "meta": {"step": 4, "identity": arch}}))
    RunDir(run_dir).config.write_text("recorded: true\n")
    out = _cli(
        "run", str(cfg), "--run-dir", str(run_dir), "--set", f"model.overrides.hidden_size={arch['hidden_size'] * 2}"
    )
    assert out.returncode == ExitCode.CONFIG_ERROR, out.stderr
    assert "hidden_size: checkpoint has" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert RunDir(run_dir).config.read_text() == "recorded: true\n"
