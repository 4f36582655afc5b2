"""The heartbeats `python -m trainer.megatron_lm` sends from the real megatron.training loop (megatron-core
0.19) on 2 gloo ranks, received by a heartbeat server the way the supervisor receives them: every phase
the supervisor times (init, build, restore, each iteration, saves, the final wait for an asynchronous
save, done) arrives in order, so hooks chained onto Megatron's module attributes really fire."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import yaml

from resilient.rank.heartbeat import HeartbeatServer
from resilient.supervisor.ranks import free_port
from tests.mcore import current_python
from tests.supervisor.harness import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ITERS = 6


def test_every_phase_of_megatrons_loop_reaches_the_supervisor(tmp_path):
    server = HeartbeatServer(tmp_path / "hb.sock")
    argv = [
        a.replace("{run_dir}", str(tmp_path))
        for a in yaml.safe_load((REPO / "examples" / "megatron_lm.yaml").read_text())["supervisor"]["rank_command"][1:]
    ]
    argv[argv.index("--train-iters") + 1], argv[argv.index("--save-interval") + 1] = str(ITERS), "3"
    argv += ["--async-save", "--async-strategy", "mcore"]  # megatron's own async writer (its default needs NVRx)
    port, procs = free_port(), []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RESILIENT_HEARTBEAT_SOCKET": str(server.path),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        procs.append(
            subprocess.Popen(
                [current_python(), *argv],
                cwd=REPO,
                env=env,
                stderr=subprocess.STDOUT,
                stdout=open(tmp_path / f"rank{rank}.log", "w"),
            )
        )
    beats = []
    try:
        deadline = time.monotonic() + 400
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            beats += server.drain()  # a datagram queue holds few messages: keep draining
            time.sleep(0.02)
        beats += server.drain()
    finally:
        for p in procs:
            p.kill()
        server.close()
    assert [p.wait() for p in procs] == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    for rank in (0, 1):
        seen = [(b["phase"], b["step"]) for b in beats if b["rank"] == rank]
        phases = [phase for phase, _ in seen]
        assert phases[:3] == ["init", "build", "restore"], seen
        steps = [step for phase, step in seen if phase == "step"]
        assert steps == sorted(steps) and set(range(1, ITERS + 1)) <= set(steps), seen
        assert phases.index("finalize") > max(i for i, (phase, step) in enumerate(seen) if (phase, step) == ("step", 1))
        assert seen[-1] == ("done", ITERS) and phases.count("done") == 1, seen
        done = [b for b in beats if b["rank"] == rank and b["phase"] == "done"][0]
        assert done["message"] == f"reached --train-iters {ITERS}"
        saves = [b["ckpt_step"] for b in beats if b["rank"] == rank and b.get("ckpt_step") is not None]
        assert {3, 6} <= set(saves), saves
