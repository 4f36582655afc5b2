"""Smaller faults: a rank lingering after `done`, a `latest` pointer that is a directory."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from tests.ranks import run_ranks
from tests.supervisor.harness import REPO, events, start, write_config

pytestmark = pytest.mark.timeout(300)


def test_rank_lingering_after_done_finishes_after_a_short_grace(tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", steps=3, supervisor={"done_grace_s": 1.0})
    run_dir = tmp_path / "run"
    proc = start(["run", str(cfg), "--run-dir", str(run_dir)], env={"FAKE_LINGER_S": "600"}, log=tmp_path / "sup.log")
    assert proc.wait(200) == ExitCode.FINISHED, (tmp_path / "sup.log").read_text()[-2000:]
    # the supervisor stopped the lingering ranks once the 1 s done grace was over: no hang in the done phase
    # (its 900 s timeout), no failure, no restart
    said = (tmp_path / "sup.log").read_text()
    assert re.search(r"node 0: ranks \[[0-9, ]+\] still running 1s after every rank reported done; stopping them", said)
    assert events(run_dir, "failure") == [] and [e["attempt"] for e in events(run_dir, "attempt_start")] == [0]


def test_latest_as_a_directory_skips_saves_on_every_rank_and_list_survives(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "latest").mkdir(parents=True)
    codes = run_ranks(run_dir, ["train.steps=4", "train.eval_every=0", "checkpoint.interval_steps=2"], timeout=280)
    assert codes == [0, 0], (run_dir / "rank0.log").read_text()[-2000:]  # no rank stuck in a collective
    failed = [e for e in ledger.read(run_dir) if e["event"] == "ckpt_save_failed"]
    assert [e["step"] for e in failed] == [2, 4] and "is not a file" in failed[0]["error"]
    p = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "ckpt", "list", str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
