"""Warm standby ranks: parked processes take the next attempt's ranks (real processes, real signals)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import psutil
import pytest
import yaml

from resilient.core.exit_codes import ExitCode
from resilient.supervisor import spares
from resilient.supervisor.spares import is_parked
from tests.supervisor.harness import (
    EXAMPLE,
    events,
    ranks_of,
    start,
    steps_done,
    wait_until,
    write_config,
    write_example_config,
)

PY = sys.executable


# -- pure -------------------------------------------------------------------------------------------


def test_own_trainer_is_parked_with_torch_megatron_and_its_modules():
    cmd, reason = spares.park_argv([PY, "-m", "trainer", "--config", "c.yaml"], PY, ["extra.mod"])
    assert cmd is not None and cmd[:3] == [PY, "-m", "resilient.rank.park"], reason
    imports = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--import"]
    assert {"torch", "megatron.core", "trainer.loop", "extra.mod"} <= set(imports)


def test_a_script_is_parked_with_its_top_level_imports_and_directory():
    cmd, reason = spares.park_argv([PY, str(EXAMPLE), "--steps", "3"], PY)
    assert cmd is not None, reason
    assert cmd[cmd.index("--script") + 1] == str(EXAMPLE)
    assert "resilient.rank" in cmd and "argparse" in cmd


@pytest.mark.parametrize(
    "argv,why",
    [
        (["/usr/bin/env", "python", "x.py"], "not this interpreter"),
        ([PY, "-u", "x.py"], "interpreter options"),
        ([PY, "/no/such/script.py"], "interpreter options"),
    ],
)
def test_other_commands_get_no_spares(argv, why):
    cmd, reason = spares.park_argv(argv, PY)
    assert cmd is None and why in reason


def test_refill_waits_for_stepping_ranks_or_the_delay():
    def due(phases, since, *, left=False):
        return spares.refill_due(phases, since, 15.0, spare_left=left)

    assert due(["step", "step"], 1.0) == (True, "every local rank is stepping")  # none left: at once
    assert not due(["step", "init"], 1.0)[0]
    assert not due(["restore", "init"], 100.0)[0]  # heartbeats: wait for steps
    assert not due([None, None], 14.9)[0]
    assert due([None, None], 15.0)[0]  # no heartbeats: after the delay
    # a spare left: the first steps after a restart run without imports beside them
    assert due(["step"], 14.9, left=True) == (False, "a spare is left: refilled 15s after the spawn")
    assert due(["step"], 15.0, left=True)[0]
    assert not due(["init"], 100.0, left=True)[0]


# -- processes ---------------------------------------------------------------------------------------


def _parked(supervisor_pid: int) -> set[int]:
    return {c.pid for c in psutil.Process(supervisor_pid).children() if is_parked(c.pid)}


DEPTH = 2
"""supervisor.spares_per_rank's default: parked processes per local rank."""
AFTER_START = 2 * (DEPTH - 1)
"""Parked once the first attempt took a spare per rank (two ranks): with one left per rank, the refill waits
for `spare_refill_delay_s`."""


def _warm(run_dir, pids: set[int]) -> bool:
    """Whether every one of `pids` said its imports are done (the spares' log)."""
    log = run_dir / "logs" / "spares.node0.log"
    text = log.read_text() if log.exists() else ""
    return all(f"pid {pid} warm after" in text for pid in pids)


def _kill_rank1_spares_take_over(proc, run_dir, log) -> set[int]:
    """SIGKILL rank 1 once the spares left after the start are warm; two of them must become the ranks and
    the run finish. Returns the pids of the spares that took the ranks. Root here: spares import on idle CPU only,
    and are ranks at normal priority once assigned."""
    parked = wait_until(lambda: len(_parked(proc.pid)) == AFTER_START and _parked(proc.pid), 60, "parked spares")
    assert {os.sched_getscheduler(pid) for pid in parked} == {os.SCHED_IDLE}
    wait_until(lambda: _warm(run_dir, parked), 120, "the spares' imports")
    ranks_of(proc.pid)[1].send_signal(signal.SIGKILL)
    took = wait_until(
        lambda: (new := {p.pid for p in ranks_of(proc.pid).values()}) <= parked and len(new) == 2 and new,
        60,
        "spares to take the ranks",
    )
    assert {os.sched_getscheduler(pid) for pid in took} == {os.SCHED_OTHER}
    assert proc.wait(90) == ExitCode.FINISHED, log.read_text()[-2000:]
    return took


def test_spares_take_the_ranks_of_the_next_attempt(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        ["run", str(write_config(tmp_path / "cfg.yaml", steps=40, health=False)), "--run-dir", str(run_dir)],
        log=tmp_path / "supervisor.log",
    )
    wait_until(lambda: any(s["step"] >= 5 for s in steps_done(run_dir)), 60, "step 5")
    took = _kill_rank1_spares_take_over(proc, run_dir, tmp_path / "supervisor.log")
    second = [e for e in events(run_dir, "attempt_start") if e["attempt"] == 1]
    assert second and second[0]["warm_ranks"] == second[0]["spare_ranks"] == 2
    assert set(second[0]["pids"]) == took  # parked and warm before the kill
    assert {s["step"] for s in steps_done(run_dir)} == set(range(1, 41))
    assert (run_dir / "logs" / "attempt1.node0.rank1.log").stat().st_mode & 0o777 == 0o600
    restart = events(run_dir, "restart")[0]
    assert restart["backoff_seconds"] == 0  # attempt 0 made progress
    status = json.loads((run_dir / "status.json").read_text())
    assert status["spares"] and all(s["count"] == 2 * DEPTH and s["rss_bytes"] > 0 for s in status["spares"].values())


def test_without_spares_every_rank_starts_cold(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", steps=4, health=False, supervisor={"warm_spares": False})
    proc = start(["run", str(cfg), "--run-dir", str(run_dir)], log=tmp_path / "supervisor.log")
    assert proc.wait(90) == ExitCode.FINISHED, (tmp_path / "supervisor.log").read_text()[-2000:]
    assert [e["warm_ranks"] for e in events(run_dir, "attempt_start")] == [0]


def test_a_foreign_python_script_runs_from_a_spare(tmp_path):
    cfg = write_example_config(tmp_path / "cfg.yaml", steps=200)
    run_dir = tmp_path / "run"
    proc = start(["run", str(cfg), "--run-dir", str(run_dir)], log=tmp_path / "supervisor.log")

    def saved(r: int) -> int:
        p = run_dir / "state" / f"rank{r}.json"
        return json.loads(p.read_text())["step"] if p.exists() else 0

    wait_until(lambda: saved(1) >= 10, 60, "rank 1 saved step 10")
    took = _kill_rank1_spares_take_over(proc, run_dir, tmp_path / "supervisor.log")
    second = [e for e in events(run_dir, "attempt_start") if e["attempt"] == 1]
    assert second and second[0]["warm_ranks"] == 2 and set(second[0]["pids"]) == took
    assert saved(0) == saved(1) == 200


def test_a_spare_dies_with_its_supervisor(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        ["run", str(write_config(tmp_path / "cfg.yaml", steps=100000, health=False)), "--run-dir", str(run_dir)],
        log=tmp_path / "supervisor.log",
    )
    parked = wait_until(lambda: len(_parked(proc.pid)) == AFTER_START and _parked(proc.pid), 60, "parked spares")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_until(
        lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in parked),
        10,
        "spares gone",
    )


FDS_BOUND = 4
"""Open files the supervisor may hold after 100 restarts beyond its fewest after 10 (a leak raises the
floor; a rank or spare starting or dying at the moment of a sample only adds a peak)."""
RSS_BOUND = 16 * 2**20
"""Resident memory the supervisor may gain between restart 10 and restart 100 (floor to floor, likewise)."""


@pytest.mark.timeout(300)
def test_100_warm_restarts_leak_no_fds_processes_or_memory(tmp_path):
    restarts = 100
    run_dir = tmp_path / "run"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        steps=100000,
        health=False,
        supervisor={"max_restarts": restarts, "status_interval_s": 5.0},
    )
    data = yaml.safe_load(cfg.read_text())
    data["metrics"] = {"enabled": False}
    cfg.write_text(yaml.safe_dump(data))
    proc = start(
        ["run", str(cfg), "--run-dir", str(run_dir)],
        log=tmp_path / "supervisor.log",
        env={"FAKE_STEP_S": "0.02", "FAKE_CRASH": "every:5"},
    )
    sup = psutil.Process(proc.pid)
    samples = []  # (attempt, open fds, processes under the supervisor, rss)
    while proc.poll() is None:
        try:
            attempt = len(events(run_dir, "attempt_start"))
            samples.append((attempt, sup.num_fds(), len(sup.children(recursive=True)), sup.memory_info().rss))
        except (psutil.Error, FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.1)
    assert proc.returncode == ExitCode.RESTART_BUDGET_EXHAUSTED, (tmp_path / "supervisor.log").read_text()[-2000:]
    starts = events(run_dir, "attempt_start")
    assert len(starts) == restarts + 1
    taken, warm = (sum(e[k] for e in starts[1:]) for k in ("spare_ranks", "warm_ranks"))
    # the pool never runs dry, even in a crash loop faster than a spare's imports (a restart every ~0.3 s:
    # there a spare may still be importing when it is taken, and finishes at normal priority)
    assert taken >= 0.95 * 2 * restarts, f"{taken} of {2 * restarts} restarted ranks went to spares ({warm} warm)"
    assert warm > 0
    early = [s for s in samples if 5 <= s[0] <= 15]
    late = [s for s in samples if s[0] >= restarts - 10]
    assert early and late
    assert min(s[1] for s in late) <= min(s[1] for s in early) + FDS_BOUND
    assert max(s[2] for s in samples) <= 2 + 2 * DEPTH + 2  # two ranks, their spares (+ a dying rank not yet reaped)
    assert min(s[3] for s in late) <= min(s[3] for s in early) + RSS_BOUND


def test_status_shows_the_spares_and_their_memory(tmp_path):
    from rich.console import Console

    from resilient.status import render_status

    console = Console(record=True, width=200)
    render_status(
        {"state": "running", "ranks": [], "spares": {"vm": {"count": 2, "rss_bytes": 3 * 2**29}}},
        console,
        run_dir=tmp_path,
    )
    assert "warm spares: vm 2 (1.50 GiB)" in console.export_text()
