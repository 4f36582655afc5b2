"""Exactly-once: a consumer SIGKILLed at several points and resumed from its last saved loader
state consumes the same samples, step for step, as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.data.conftest import REPO

STEPS, CKPT_EVERY = 24, 4
KILL_AFTER_STEPS = (3, 9, 18)  # between checkpoints, so some steps are lost and recomputed


def _start(prepared, state: Path, log: Path) -> subprocess.Popen:
    cfg, run_dir = prepared
    cmd = [
        sys.executable,
        "-m",
        "tests.data.consumer",
        str(cfg.path),
        str(run_dir),
        str(state),
        str(log),
        "--steps",
        str(STEPS),
        "--ckpt-every",
        str(CKPT_EVERY),
        "--step-sleep",
        "0.1",
        "--workers",
        "1",
    ]
    # Own session: the kill takes the DataLoader worker with it, as a node failure would.
    return subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True)


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _kill_after(proc: subprocess.Popen, log: Path, steps: int) -> None:
    deadline = time.monotonic() + 120
    while len(_records(log)) < steps:
        assert proc.poll() is None, f"consumer exited early: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "consumer made no progress"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_killed_and_resumed_runs_consume_the_same_samples(prepared, tmp_path):
    ref_log = tmp_path / "reference.log"
    ref = _start(prepared, tmp_path / "reference.state", ref_log)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    reference = {r["step"]: r["hashes"] for r in _records(ref_log)}
    assert sorted(reference) == list(range(STEPS))
    all_samples = [h for step in range(STEPS) for h in reference[step]]
    assert len(set(all_samples)) == len(all_samples), "a sample repeated within the first epoch"

    state, log = tmp_path / "killed.state", tmp_path / "killed.log"
    for kill_at in KILL_AFTER_STEPS:
        _kill_after(_start(prepared, state, log), log, kill_at)
    final = _start(prepared, state, log)
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]

    consumed: dict[int, list[str]] = {}
    recomputed = 0
    for rec in _records(log):
        if rec["step"] in consumed:  # lost after the kill, redone after the resume: must be identical
            assert consumed[rec["step"]] == rec["hashes"], f"step {rec['step']} differs when recomputed"
            recomputed += 1
        consumed[rec["step"]] = rec["hashes"]
    assert consumed == reference
    assert recomputed > 0, "no kill landed between checkpoints; the test did not exercise a resume"
    assert len({r["pid"] for r in _records(log)}) == len(KILL_AFTER_STEPS) + 1
