"""Launch real trainer ranks (`python -m trainer`) the way the supervisor does, for tests and benches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from resilient.core.exit_codes import ExitCode
from resilient.supervisor.ranks import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"


def rank_env(rank: int, world: int, port: int, run_dir: Path, extra: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RESILIENT_RUN_DIR": str(run_dir),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
    )
    env.pop("RESILIENT_HEARTBEAT_SOCKET", None)
    env.pop("RESILIENT_SUPERVISOR_PID", None)
    env.update(extra or {})
    return env


def _trainer_argv(config: Path, world: int, overrides: list[str]) -> list[str]:
    sets = [a for o in [f"supervisor.nproc_per_node={world}", *overrides] for a in ("--set", o)]
    return [sys.executable, "-m", "trainer", "--config", str(config), *sets]


def spawn_ranks(
    run_dir: Path, overrides: list[str], *, world: int = 2, config: Path = TINY, extra_env: dict | None = None
) -> list[subprocess.Popen]:
    """Start `world` ranks on this machine, logs in run_dir/rank{R}.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world):
        log = open(run_dir / f"rank{rank}.log", "ab")
        procs.append(
            subprocess.Popen(
                _trainer_argv(config, world, overrides),
                cwd=REPO,
                env=rank_env(rank, world, port, run_dir, extra_env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return codes


def run_ranks(run_dir: Path, overrides: list[str], *, world: int = 2, timeout: float = 300, **kw) -> list[int]:
    return wait_all(spawn_ranks(run_dir, overrides, world=world, **kw), timeout)


def refusal_line(run_dir: Path, overrides: list[str], *, world: int) -> str:
    """Rank 0 of `world` on TINY with `overrides`, a config it must refuse: it exits CONFIG_ERROR (64) with
    exactly one line on stderr, which is returned."""
    proc = subprocess.run(
        _trainer_argv(TINY, world, overrides),
        cwd=REPO,
        env=rank_env(0, world, 29999, run_dir),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == ExitCode.CONFIG_ERROR == 64, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def resilient_cli(
    *args: str, timeout: float = 120, python: str = sys.executable, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`resilient ARGS` with `python` (another megatron-core line's interpreter, when given), `env` added to ours."""
    return subprocess.run(
        [python, "-m", "resilient.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def digest(run_dir: Path, step: int | None = None, python: str = sys.executable) -> str:
    args = ["ckpt", "digest", str(run_dir)] + (["--step", str(step)] if step is not None else [])
    out = resilient_cli(*args, python=python)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def train_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from RUN_DIR/train_log.jsonl; the last occurrence of a recomputed step wins."""
    from resilient.core.ledger import read_jsonl

    return {rec["step"]: rec["loss"] for rec in read_jsonl(run_dir / "train_log.jsonl") if "loss" in rec}
