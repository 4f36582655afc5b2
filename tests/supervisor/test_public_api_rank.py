"""A rank that uses only the public rank API (examples/supervised_rank.py, shown in docs/rank-protocol.md)
gets hang detection and preemption; the Megatron-LM adapter sends what its hook points mean."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from resilient.core.exit_codes import ExitCode
from resilient.rank import Phase, RankEnv
from resilient.rank import ft_hooks as mlm_hooks
from resilient.rank.heartbeat import HeartbeatServer
from tests.supervisor.harness import (
    EXAMPLE,
    REPO,
    events,
    hang_step_timeout,
    ranks_of,
    start,
    wait_until,
    write_example_config,
)

pytestmark = pytest.mark.timeout(120)


def test_the_docs_show_the_example_verbatim():
    assert EXAMPLE.read_text() in (REPO / "docs" / "rank-protocol.md").read_text()


def _run(tmp_path: Path, steps: int, supervisor: dict | None = None):
    cfg = write_example_config(tmp_path / "cfg.yaml", steps, supervisor)
    run_dir = tmp_path / "run"
    return start(["run", str(cfg), "--run-dir", str(run_dir)], log=tmp_path / "supervisor.log"), run_dir


def _saved(run_dir: Path, rank: int) -> int | None:
    path = run_dir / "state" / f"rank{rank}.json"
    return json.loads(path.read_text())["step"] if path.exists() else None


def _reported_steps(run_dir: Path) -> list[int]:
    """Each rank's step as the supervisor last published it (status.json); empty before both are known."""
    try:
        rows = json.loads((run_dir / "status.json").read_text()).get("ranks") or []
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    steps = [r.get("step") for r in rows]
    return [int(s) for s in steps] if len(steps) == 2 and None not in steps else []


def test_sigstopped_rank_is_found_hung_and_the_run_finishes(tmp_path):
    sup = {"step_timeout_floor_s": 1.5, "step_timeout_factor": 3.0, "step_timeout_min_samples": 3}
    proc, run_dir = _run(tmp_path, 60, sup)
    wait_until(lambda: (_saved(run_dir, 0) or 0) >= 10, 60, "rank 0 saved step 10")
    stopped = time.time()
    ranks_of(proc.pid)[1].send_signal(signal.SIGSTOP)
    assert proc.wait(90) == ExitCode.FINISHED, (tmp_path / "supervisor.log").read_text()[-2000:]
    [failure] = events(run_dir, "failure")
    assert failure["kind"] == "hang" and failure["rank"] == 1 and failure["ts"] > stopped
    # under the step timeout calibrated from the steps seen (at least the floor), not the 600 s initial one
    assert 1.5 <= hang_step_timeout(failure) < 600.0, failure
    assert _saved(run_dir, 0) == _saved(run_dir, 1) == 60


def test_supervisor_sigterm_preempts_with_a_save(tmp_path):
    proc, run_dir = _run(tmp_path, 100000, {"status_interval_s": 0.2})
    wait_until(lambda: (_saved(run_dir, 1) or 0) >= 10, 60, "rank 1 saved step 10")
    wait_until(lambda: min(_reported_steps(run_dir), default=0) > 10, 60, "both ranks past step 10")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == ExitCode.PREEMPTED
    assert all(_saved(run_dir, r) > 10 for r in (0, 1))  # saved where the stop request found them, past step 10
    assert events(run_dir, "failure") == [] and len(events(run_dir, "preempted")) == 1


def test_megatron_lm_hook_points_become_heartbeats(tmp_path):
    server = HeartbeatServer(tmp_path / "hb")
    hooks = mlm_hooks.setup(RankEnv(rank=3, heartbeat_socket=server.path))
    mlm_hooks.on_checkpoint_loaded(is_local_chkpt=False)  # Megatron's own call: no heartbeat
    mlm_hooks.resumed(100)
    for _ in range(2):
        mlm_hooks.on_checkpointing_start()  # the async finalization before each iteration
        mlm_hooks.on_checkpointing_end(is_async_finalization=True)
        mlm_hooks.on_training_step_start()
        mlm_hooks.on_training_step_end(loss=2.5)
    got = server.drain()  # a Unix datagram queue may hold as few as 10 (net.unix.max_dgram_qlen)
    mlm_hooks.on_eval_step_start()
    mlm_hooks.on_eval_step_start()
    mlm_hooks.on_training_step_start()  # the evaluation ended: back to the step timeout
    mlm_hooks.on_training_step_end()
    mlm_hooks.on_checkpointing_start()
    mlm_hooks.on_checkpointing_end(is_async_finalization=False)
    mlm_hooks.shutdown()
    got += server.drain()
    assert [(b["phase"], b["step"]) for b in got] == [
        ("init", 0),
        ("restore", 100),
        ("checkpoint", 100),
        ("step", 100),
        ("step", 101),
        ("checkpoint", 101),
        ("step", 101),
        ("step", 102),
        ("eval", 102),
        ("step", 102),
        ("step", 103),
        ("checkpoint", 103),
        ("step", 103),
        ("done", 103),
    ]
    assert got[4]["loss"] == 2.5 and got[4]["step_time"] >= 0 and "ckpt_step" not in got[3]
    assert got[12]["ckpt_step"] == 103 and got[12]["ckpt_blocking_s"] >= 0
    assert hooks.iteration == 103 and got[-1]["phase"] == Phase.DONE
    mlm_hooks.on_training_step_end()  # after shutdown: a no-op
    server.close()


def test_megatron_lm_hooks_announce_trainings_start_without_an_async_save(tmp_path):
    # Without --async-save no finalization hook runs before the first iteration: the step start says that
    # training starts at the resumed iteration, so the supervisor gives that first step its own timeout
    server = HeartbeatServer(tmp_path / "hb")
    mlm_hooks.setup(RankEnv(rank=0, heartbeat_socket=server.path))
    mlm_hooks.resumed(7)
    for _ in range(2):
        mlm_hooks.on_training_step_start()
        mlm_hooks.on_training_step_end()
    got = [(b["phase"], b["step"]) for b in server.drain()]
    server.close()
    assert got == [("init", 0), ("restore", 7), ("step", 7), ("step", 8), ("step", 9)]
