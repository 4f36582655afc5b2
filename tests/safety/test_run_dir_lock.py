"""One run per run dir: a second `resilient run` (or `launch`) on a live run's directory refuses at
once, touching nothing; the first run finishes undisturbed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from resilient.core import lock
from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir
from tests.supervisor.harness import REPO, start, steps_done, wait_until, write_config

pytestmark = pytest.mark.timeout(180)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resilient.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_second_run_on_a_live_run_dir_refuses_and_touches_nothing(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", steps=400)
    run_dir = tmp_path / "run"
    first = start(["run", str(cfg), "--run-dir", str(run_dir)], env={"FAKE_STEP_S": "0.2"}, log=tmp_path / "first.log")
    try:
        wait_until(lambda: steps_done(run_dir), 90, "first run stepping")
        rd = RunDir(run_dir)
        before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (rd.config, rd.heartbeat_socket(0))}
        other = write_config(tmp_path / "other.yaml", steps=7)
        second = _cli("run", str(other), "--run-dir", str(run_dir))
        # refused at once: it returned while the first run still held the dir, not after waiting for it
        assert first.poll() is None
        assert second.returncode == ExitCode.RUN_DIR_BUSY, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0], second.stderr
        assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in before} == before
        assert "steps: 400" in rd.config.read_text()
        assert json.loads(rd.lock.read_text())["pid"] == first.pid
        assert first.returncode is None  # undisturbed: still training
        first.send_signal(signal.SIGTERM)
        assert first.wait(120) == ExitCode.PREEMPTED
    finally:
        first.kill()
    steps = [s["step"] for s in steps_done(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no duplicate steps
    lock.acquire(run_dir).release()  # the lock died with its holder: the next run may start


def test_launch_refuses_while_a_local_run_holds_the_dir(tmp_path):
    run_dir = tmp_path / "run"
    held = lock.acquire(run_dir)
    try:
        cfg = write_config(tmp_path / "cfg.yaml", steps=5)
        out = _cli("launch", str(cfg), "--run-dir", str(run_dir))
        assert out.returncode == ExitCode.RUN_DIR_BUSY, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and f"pid {os.getpid()}" in out.stderr
        assert not RunDir(run_dir).config.exists()
    finally:
        held.release()
