"""The adaptive checkpoint interval end to end: the trainer's change reaches the ledger, and the failure
history and calibration the supervisor persisted survive its death (SIGKILL) into the next run."""

from __future__ import annotations

import itertools
import json
import signal

import psutil
import pytest

from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir
from tests.supervisor.harness import REPO, events, ranks_of, start, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# Both tiers start outside the bounds [4, 8] (disk every 3 steps, memory every 2): every decision is a
# change, whatever the machine measures.
SETS = [
    "train.eval_every=0",
    "train.warmup_steps=4",
    "metrics.port=0",
    "checkpoint.adaptive=true",
    "checkpoint.interval_steps=3",
    "checkpoint.memory_interval_steps=2",
    "checkpoint.min_interval_steps=4",
    "checkpoint.max_interval_steps=8",
    "checkpoint.cost_window_steps=2",
    "checkpoint.prior_mtbf_hours=0.01",
    "supervisor.termination_grace_s=3",
    "supervisor.backoff_initial_s=0.1",
    "supervisor.nproc_per_node=1",
]


def assert_saves_follow_the_schedule(run_dir, attempt: int, configured: int) -> None:
    """The disk saves of one attempt came at the intervals the schedule chose: after the save at step a,
    the next is the first step b with b - a >= the interval in force at b (the newest change recorded
    at a step before b: a decision is taken after that step's save decision)."""
    changes = sorted(
        (e["step"], e["steps"])
        for e in events(run_dir, "ckpt_interval")
        if e["tier"] == "disk" and e["attempt"] == attempt
    )

    def interval_at(step: int) -> int:
        return ([steps for at, steps in changes if at < step] or [configured])[-1]

    saves = sorted(e["step"] for e in events(run_dir, "ckpt_save"))
    assert len(saves) >= 2, saves
    for a, b in itertools.pairwise(saves):
        assert b - a >= interval_at(b) and all(t - a < interval_at(t) for t in range(a + 1, b)), (a, b, changes)


def _run(run_dir, log, steps):
    return start(
        [
            "run",
            str(REPO / "examples" / "tiny.yaml"),
            "--run-dir",
            str(run_dir),
            *[a for s in [*SETS, f"train.steps={steps}"] for a in ("--set", s)],
        ],
        log=log,
    )


def test_interval_change_reaches_the_ledger_and_history_survives_the_supervisor(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "supervisor.log"
    proc = _run(run_dir, log, steps=100_000)  # killed long before
    try:

        def first_per_tier():
            tiers: dict = {}
            for e in events(run_dir, "ckpt_interval"):
                tiers.setdefault(e["tier"], e)
            return tiers if len(tiers) == 2 else None

        tiers = wait_until(first_per_tier, 240, "an interval change of each tier")
        first = tiers["disk"]
        assert (first["previous"], first["failures"]) == (3, 0), first
        assert (tiers["memory"]["previous"], tiers["memory"]["failures"]) == (2, 0), tiers["memory"]
        for e in tiers.values():
            assert 4 <= e["steps"] <= 8 and e["save_cost_s"] >= 0 and e["step_s"] > 0
            assert "save cost measured" in e["reason"]
        wait_until(
            lambda: any(e["step"] > first["step"] for e in events(run_dir, "ckpt_save")),
            240,
            "a disk save at the changed interval",
        )
        wait_until(
            lambda: json.loads(RunDir(run_dir).calibration_file(0).read_text())["step_times"],
            30,
            "step times persisted",
        )
        ranks = list(ranks_of(proc.pid).values())
        proc.send_signal(signal.SIGKILL)  # no clean end: the calibration file stays open
        proc.wait(10)
        psutil.wait_procs(ranks, timeout=10)
    finally:
        proc.kill()
    assert_saves_follow_the_schedule(run_dir, first["attempt"], configured=3)
    died = json.loads(RunDir(run_dir).calibration_file(0).read_text())
    assert died["open"] is True and died["step_times"] and died["exposure_s"] > 0

    log_lines = RunDir(run_dir).train_log.read_text().splitlines()
    reached = max(json.loads(line)["step"] for line in log_lines)  # memory snapshots may be newer than disk
    proc = _run(run_dir, log, steps=reached + 3)  # a few steps more: the start's decision is what is tested
    assert proc.wait(240) == ExitCode.FINISHED, log.read_text()[-3000:]
    disk = [e for e in events(run_dir, "ckpt_interval") if e["tier"] == "disk"]
    before = [e for e in disk if e["attempt"] == first["attempt"]]
    after = [e for e in disk if e["attempt"] != first["attempt"]]
    assert after, disk
    # the new run continues from the interval chosen before the kill, knowing of the failure; a
    # decision at start, if any, moves from there
    assert after[0]["reason"].startswith("at start: the interval chosen before the restart"), after[0]
    assert (after[0]["previous"], after[0]["steps"], after[0]["failures"]) == (3, before[-1]["steps"], 1), after[0]
    for e in after[1:]:
        assert e["failures"] == 1 and 4 <= e["steps"] <= 8, e
    cal = json.loads(RunDir(run_dir).calibration_file(0).read_text())
    assert cal["open"] is False and [f["kind"] for f in cal["failures"]] == ["supervisor_lost"]
    assert cal["exposure_s"] > died["exposure_s"]
