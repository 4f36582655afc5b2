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
from tests.supervisor.harness import REPO, events, ranks_of, start, steps_done, wait_until, write_config

PY = sys.executable
EXAMPLE = REPO / "examples" / "supervised_rank.py"


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
    assert spares.refill_due(["step", "step"], 1.0, 15.0)[0]
    assert not spares.refill_due(["step", "init"], 1.0, 15.0)[0]
    assert not spares.refill_due(["restore", "init"], 100.0, 15.0)[0]  # heartbeats: wait for steps
    assert not spares.refill_due([None, None], 14.9, 15.0)[0]
    assert spares.refill_due([None, None], 15.0, 15.0)[0]  # no heartbeats: after the delay


# -- processes ---------------------------------------------------------------------------------------


def _parked(supervisor_pid: int) -> set[int]:
    return {c.pid for c in psutil.Process(supervisor_pid).children() if is_parked(c.pid)}


def _kill_rank1_spares_take_over(proc, log) -> set[int]:
    """SIGKILL rank 1 once two spares are parked; they must become the ranks and the run finish.
    Returns the spares' pids. Root here: spares import on idle CPU only, and are ranks at normal
    priority once assigned."""
    parked = wait_until(lambda: len(_parked(proc.pid)) == 2 and _parked(proc.pid), 60, "two parked spares")
    assert {os.sched_getscheduler(pid) for pid in parked} == {os.SCHED_IDLE}
    ranks_of(proc.pid)[1].send_signal(signal.SIGKILL)
    wait_until(lambda: set(p.pid for p in ranks_of(proc.pid).values()) == parked, 60, "spares to take the ranks")
    assert {os.sched_getscheduler(pid) for pid in parked} == {os.SCHED_OTHER}
    assert proc.wait(90) == ExitCode.FINISHED, log.read_text()[-2000:]
    return parked


def test_spares_take_the_ranks_of_the_next_attempt(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        ["run", str(write_config(tmp_path / "cfg.yaml", steps=40, health=False)), "--run-dir", str(run_dir)],
        log=tmp_path / "supervisor.log",
    )
    wait_until(lambda: any(s["step"] >= 5 for s in steps_done(run_dir)), 60, "step 5")
    parked = _kill_rank1_spares_take_over(proc, tmp_path / "supervisor.log")
    second = [e for e in events(run_dir, "attempt_start") if e["attempt"] == 1]
    assert second and second[0]["warm_ranks"] == 2 and set(second[0]["pids"]) == parked  # existed before the kill
    assert {s["step"] for s in steps_done(run_dir)} == set(range(1, 41))
    assert (run_dir / "logs" / "attempt1.node0.rank1.log").stat().st_mode & 0o777 == 0o600
    restart = events(run_dir, "restart")[0]
    assert restart["backoff_seconds"] == 0  # attempt 0 made progress
    status = json.loads((run_dir / "status.json").read_text())
    assert status["spares"] and all(s["count"] == 2 and s["rss_bytes"] > 0 for s in status["spares"].values())


def test_without_spares_every_rank_starts_cold(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", steps=4, health=False, supervisor={"warm_spares": False})
    proc = start(["run", str(cfg), "--run-dir", str(run_dir)], log=tmp_path / "supervisor.log")
    assert proc.wait(90) == ExitCode.FINISHED, (tmp_path / "supervisor.log").read_text()[-2000:]
    assert [e["warm_ranks"] for e in events(run_dir, "attempt_start")] == [0]


def test_a_foreign_python_script_runs_from_a_spare(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "supervisor": {
                    "nproc_per_node": 2,
                    "backoff_initial_s": 0.1,
                    "termination_grace_s": 2.0,
                    "rank_command": [PY, str(EXAMPLE), "--steps", "200", "--save", "{run_dir}/state"],
                },
                "health": {"enabled": False},
                "metrics": {"enabled": False},
            }
        )
    )
    run_dir = tmp_path / "run"
    proc = start(["run", str(cfg), "--run-dir", str(run_dir)], log=tmp_path / "supervisor.log")

    def saved(r: int) -> int:
        p = run_dir / "state" / f"rank{r}.json"
        return json.loads(p.read_text())["step"] if p.exists() else 0

    wait_until(lambda: saved(1) >= 10, 60, "rank 1 saved step 10")
    parked = _kill_rank1_spares_take_over(proc, tmp_path / "supervisor.log")
    second = [e for e in events(run_dir, "attempt_start") if e["attempt"] == 1]
    assert second and second[0]["warm_ranks"] == 2 and set(second[0]["pids"]) == parked
    assert saved(0) == saved(1) == 200


def test_a_spare_dies_with_its_supervisor(tmp_path):
    run_dir = tmp_path / "run"
    proc = start(
        ["run", str(write_config(tmp_path / "cfg.yaml", steps=100000, health=False)), "--run-dir", str(run_dir)],
        log=tmp_path / "supervisor.log",
    )
    parked = wait_until(lambda: len(_parked(proc.pid)) == 2 and _parked(proc.pid), 60, "two parked spares")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_until(
        lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in parked),
        10,
        "spares gone",
    )


FDS_BOUND = 4
"""Open files the supervisor may hold after 100 restarts beyond its most after 10."""
RSS_BOUND = 16 * 2**20
"""Resident memory the supervisor may gain between restart 10 and restart 100."""


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
    warm = sum(e["warm_ranks"] for e in starts[1:])
    # spares are refilled as soon as a rank is handed over: all but a few restarted ranks start warm
    # (200 of 200 on 2 busy cores; a crash that beats a refill starts cold)
    assert warm >= 0.95 * 2 * restarts, f"{warm} of {2 * restarts} restarted ranks started warm"
    early = [s for s in samples if 5 <= s[0] <= 15]
    late = [s for s in samples if s[0] >= restarts - 10]
    assert early and late
    assert max(s[1] for s in late) <= max(s[1] for s in early) + FDS_BOUND
    assert max(s[2] for s in samples) <= 2 * 2 + 2  # two ranks, two spares (+ a dying rank not yet reaped)
    assert max(s[3] for s in late) <= max(s[3] for s in early) + RSS_BOUND


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
