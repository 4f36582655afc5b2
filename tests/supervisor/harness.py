"""Helpers for supervisor tests: configs, supervisor processes, ledger and fake-rank progress."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import yaml

from resilient.core import ledger
from resilient.supervisor.spares import is_parked

FAKE_RANK = Path(__file__).with_name("fake_rank.py")
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "supervised_rank.py"


def write_config(
    path: Path,
    *,
    steps: int = 20,
    nodes: int = 1,
    nproc: int = 2,
    supervisor: dict[str, Any] | None = None,
    health: bool = True,
) -> Path:
    tree = {
        "nodes": nodes,
        "train": {"steps": steps},
        "supervisor": {
            "nproc_per_node": nproc,
            "rank_command": [sys.executable, str(FAKE_RANK), "--config", "{config}"],
            "backoff_initial_s": 0.1,
            "backoff_max_s": 0.5,
            "termination_grace_s": 2.0,
            "step_timeout_initial_s": 20.0,
            "final_save_check": True,  # fake_rank.py saves in our layout
            **(supervisor or {}),
        },
        "health": {"enabled": health},
        "metrics": {"port": 0},
    }
    path.write_text(yaml.safe_dump(tree))
    return path


def write_example_config(path: Path, steps: int, supervisor: dict[str, Any] | None = None) -> Path:
    """A config whose two ranks run examples/supervised_rank.py (the public rank API only), saving to RUN_DIR/state."""
    rank = [sys.executable, str(EXAMPLE), "--steps", str(steps), "--save", "{run_dir}/state"]
    tree = {
        "supervisor": {
            "nproc_per_node": 2,
            "backoff_initial_s": 0.1,
            "termination_grace_s": 2.0,
            "rank_command": rank,
            **(supervisor or {}),
        },
        "health": {"enabled": False},
        "metrics": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(tree))
    return path


def start(args: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """`resilient ARGS` as a real process (stderr to `log` when given)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "resilient.cli", *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=out,
    )


def supervise_args(config: Path, run_dir: Path, port: int, node: int = 0, nnodes: int = 1) -> list[str]:
    """`resilient supervise` arguments for node `node` of `nnodes`, node 0's store on 127.0.0.1:`port`."""
    return [
        "supervise",
        str(config),
        "--run-dir",
        str(run_dir),
        "--node-rank",
        str(node),
        "--nnodes",
        str(nnodes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
    ]


def start_nodes(
    config: Path,
    run_dir: Path,
    port: int,
    log_dir: Path,
    *,
    name: str,
    env: dict[str, str] | None = None,
    args: Sequence[str] = (),
) -> list[subprocess.Popen]:
    """Two supervisors on this machine as nodes `{name}0` and `{name}1` of one job (RESILIENT_JOB_INSTANCE: the
    port unless `env` says otherwise), `resilient supervise ... ARGS`, stderr in LOG_DIR/node{N}.log."""
    return [
        start(
            [*supervise_args(config, run_dir, port, n, 2), *args],
            env={"RESILIENT_NODE_NAME": f"{name}{n}", "RESILIENT_JOB_INSTANCE": str(port), **(env or {})},
            log=log_dir / f"node{n}.log",
        )
        for n in (0, 1)
    ]


def wait_until(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def events(run_dir: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in ledger.read(run_dir) if e["event"] == name]


def hang_step_timeout(failure: dict[str, Any]) -> float:
    """The step timeout a `hang` failure was declared under, from its reason ("... (exceeds step timeout 1.5s)")."""
    found = re.search(r"exceeds step timeout ([0-9.e+]+)s", failure["reason"])
    assert failure["kind"] == "hang" and found, failure
    return float(found.group(1))


def steps_done(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "fake_steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ranks_of(supervisor_pid: int) -> dict[int, psutil.Process]:
    """Global rank -> live rank process among the supervisor's children (from their environment); parked
    spares carry the identity of the rank they will take, so they are left out."""
    out = {}
    for child in psutil.Process(supervisor_pid).children():
        try:
            if is_parked(child.pid):
                continue
            out[int(child.environ()["RANK"])] = child
        except (psutil.Error, KeyError):
            continue
    return out
