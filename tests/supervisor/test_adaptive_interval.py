"""The adaptive checkpoint interval end to end: the trainer's change reaches the ledger, and the failure
history and calibration the supervisor persisted survive its death (SIGKILL) into the next run."""

from __future__ import annotations

import json
import signal

import psutil
import pytest

from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir
from tests.supervisor.harness import REPO, events, ranks_of, start, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Starts at 3 steps, outside the bounds [4, 8]: every decision is a change, whatever the machine measures.
SETS = ["train.eval_every=0", "train.warmup_steps=4", "metrics.port=0", "checkpoint.adaptive=true",
        "checkpoint.interval_steps=3", "checkpoint.min_interval_steps=4", "checkpoint.max_interval_steps=8",
        "checkpoint.cost_window_steps=2", "checkpoint.prior_mtbf_hours=0.01", "supervisor.termination_grace_s=3",
        "supervisor.backoff_initial_s=0.1", "supervisor.nproc_per_node=1"]


def _run(run_dir, log, steps):
    return start(["run", str(REPO / "examples" / "tiny.yaml"), "--run-dir", str(run_dir),
                  *[a for s in [*SETS, f"train.steps={steps}"] for a in ("--set", s)]], log=log)


def test_interval_change_reaches_the_ledger_and_history_survives_the_supervisor(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "supervisor.log"
    proc = _run(run_dir, log, steps=100_000)  # killed long before
    try:
        first = wait_until(lambda: events(run_dir, "ckpt_interval"), 240, "an interval change")[0]
        assert (first["tier"], first["previous"], first["failures"]) == ("disk", 3, 0), first
        assert 4 <= first["steps"] <= 8 and first["save_cost_s"] >= 0 and first["step_s"] > 0
        assert "save cost measured" in first["reason"]
        wait_until(lambda: json.loads(RunDir(run_dir).calibration_file(0).read_text())["step_times"], 30,
                   "step times persisted")
        ranks = list(ranks_of(proc.pid).values())
        proc.send_signal(signal.SIGKILL)  # no clean end: the calibration file stays open
        proc.wait(10)
        psutil.wait_procs(ranks, timeout=10)
    finally:
        proc.kill()
    died = json.loads(RunDir(run_dir).calibration_file(0).read_text())
    assert died["open"] is True and died["step_times"] and died["exposure_s"] > 0

    saved = max(e["step"] for e in events(run_dir, "ckpt_save"))
    proc = _run(run_dir, log, steps=saved + 3)  # a few steps more: the start's decision is what is tested
    assert proc.wait(240) == ExitCode.FINISHED, log.read_text()[-3000:]
    after = [e for e in events(run_dir, "ckpt_interval") if e["attempt"] != first["attempt"]]
    assert after, events(run_dir, "ckpt_interval")
    assert after[0]["failures"] == 1 and after[0]["reason"].startswith("at start"), after[0]
    assert after[0]["previous"] == 3 and 4 <= after[0]["steps"] <= 8
    cal = json.loads(RunDir(run_dir).calibration_file(0).read_text())
    assert cal["open"] is False and [f["kind"] for f in cal["failures"]] == ["supervisor_lost"]
    assert cal["exposure_s"] > died["exposure_s"]
