"""Storage trouble is its own fault class: never success with the final step unsaved, never a node
fault, and the supervisor outlives a full run directory. Real tmpfs filesystems, real processes."""

from __future__ import annotations

import json
import time

import pytest
import yaml

from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir
from tests.safety.conftest import fill
from tests.supervisor.harness import events, start, steps_done, wait_until, write_config

pytestmark = pytest.mark.timeout(240)


def _config(path, steps, *, ckpt_dir=None, health=None):
    cfg = write_config(path, steps=steps, health=health is not None)
    tree = yaml.safe_load(cfg.read_text())
    if ckpt_dir is not None:
        tree["checkpoint"] = {"dir": str(ckpt_dir)}
    if health:
        tree["health"] = {"enabled": True, "shm_min_gib": 0.001, "mem_min_available_gib": 0.01, **health}
    cfg.write_text(yaml.safe_dump(tree))
    return cfg


def _committed(root):
    return sorted(int(p.parent.name[5:]) for p in root.glob("step_*/COMMITTED.json"))


def test_saves_refused_for_lack_of_space_never_end_finished(tmp_path, tmpfs):
    ckpt = tmpfs("256k")
    fill(ckpt)  # every save is refused (the rank skips it and trains on, as the trainer does)
    cfg = _config(tmp_path / "cfg.yaml", 6, ckpt_dir=ckpt)
    run_dir = tmp_path / "run"
    proc = start(["run", str(cfg), "--run-dir", str(run_dir)], log=tmp_path / "sup.log")
    assert proc.wait(180) == ExitCode.STORAGE_FAULT, (tmp_path / "sup.log").read_text()[-2000:]
    assert max(s["step"] for s in steps_done(run_dir)) == 6
    [fault] = events(run_dir, "storage_fault")
    assert "step 6 but it is not in a committed checkpoint" in fault["reason"]
    assert not events(run_dir, "finished")
    assert json.loads(RunDir(run_dir).status.read_text())["state"] == "storage_fault"


def test_low_space_mid_run_saves_and_stops_as_storage_fault_not_unhealthy_node(tmp_path, tmpfs):
    ckpt = tmpfs("4m")
    health = {"ckpt_min_free_gib": 2 / 1024, "write_test_bytes": 4096, "monitor_interval_s": 0.5}
    cfg = _config(tmp_path / "cfg.yaml", 400, ckpt_dir=ckpt, health=health)
    run_dir = tmp_path / "run"
    proc = start(
        ["run", str(cfg), "--run-dir", str(run_dir)],
        env={"FAKE_STEP_S": "0.2", "FAKE_CKPT_EVERY": "1000"},
        log=tmp_path / "sup.log",
    )
    try:
        wait_until(lambda: len(steps_done(run_dir)) >= 3, 120, "training")
        fill(ckpt, leave_bytes=1 << 20)  # 1 MiB left: below the 2 MiB threshold, room for a save
        code = proc.wait(120)
    finally:
        proc.kill()
    log = (tmp_path / "sup.log").read_text()
    assert code == ExitCode.STORAGE_FAULT, log[-2000:]
    reached = max(s["step"] for s in steps_done(run_dir))
    assert _committed(ckpt)[-1] == reached  # the early save kept every step made
    [fault] = events(run_dir, "storage_fault")
    assert "node.ckpt_dir" in fault["reason"]
    assert not [e for e in events(run_dir, "gave_up") if e["exit_code"] == ExitCode.UNHEALTHY_NODE]
    assert not [e for e in events(run_dir, "failure") if e["kind"] == "health"]


def test_supervisor_survives_a_full_run_dir_and_says_so(tmp_path, tmpfs):
    run_dir = tmpfs("8m") / "run"
    cfg = _config(tmp_path / "cfg.yaml", 50, ckpt_dir=tmp_path / "ckpt")
    proc = start(["run", str(cfg), "--run-dir", str(run_dir)], env={"FAKE_STEP_S": "0.2"}, log=tmp_path / "sup.log")
    try:
        wait_until(lambda: len(steps_done(run_dir)) >= 3, 120, "training")
        filler = fill(run_dir.parent)
        wait_until(lambda: "cannot write" in (tmp_path / "sup.log").read_text(), 60, "the supervisor to notice")
        time.sleep(1.0)
        filler.unlink()
        code = proc.wait(120)
    finally:
        proc.kill()
    log = (tmp_path / "sup.log").read_text()
    assert code == ExitCode.FINISHED, log[-2000:]
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if "cannot write" in line]
    assert len(lines) == len(set(lines)) and "No space left on device" in lines[0]
    status = json.loads(RunDir(run_dir).status.read_text())
    assert status["state"] == "finished" and status["storage_errors"], status
