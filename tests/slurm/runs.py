"""Whole runs on the local clusters: a tiny training config, launching, waiting, the final digest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import yaml

from resilient.supervisor.ranks import free_port
from resilient.supervisor.spares import is_parked
from tests.slurm.conftest import REPO, Cluster

STEPS = 24
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
HEALTHY_GPU = {"available": True, "device_count": 1, "devices": [{"index": 0}]}
FAILED_GPU = {"available": True, "device_count": 1, "devices": [{"index": 0, "lost": True}]}


def write_run_config(
    tmp: Path,
    name: str,
    *,
    hosts: tuple[str, ...] = ("n0", "n1"),
    sections: dict[str, dict[str, Any]] | None = None,
    **slurm,
) -> tuple[Path, Path]:
    """A tiny two-node run; returns (config path, run dir). Each node's GPU state is scripted in nvml/.
    `sections` adds to (or replaces) keys of the config's sections; the training stays the reference's."""
    nvml = tmp / f"{name}-nvml"
    nvml.mkdir()
    for node in hosts:
        (nvml / f"{node}.json").write_text(json.dumps(HEALTHY_GPU))
    run_dir = tmp / name
    cfg = {
        "run_dir": str(run_dir),
        "nodes": 2,
        "model": {"preset": "tiny"},
        "train": {"steps": STEPS, "global_batch": 4, "micro_batch": 2, "seq_len": 64, "warmup_steps": 2},
        "data": {
            "path": str(REPO / "examples/data/c4-sample"),
            "tokenizer": str(REPO / "examples/tokenizer.json"),
            "validation_docs": 20,
            "num_workers": 0,
        },
        "checkpoint": {"interval_steps": 8},
        "supervisor": {"nproc_per_node": 1, "store_port": free_port()},
        "metrics": {"port": 0},
        "health": {"fake_nvml_dir": str(nvml)},
        "slurm": {"time_limit_minutes": 10, "signal_seconds": 60, "exclusive": False, **slurm},
    }
    for section, values in (sections or {}).items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run_dir


def launch(cluster: Cluster, config: Path) -> str:
    out = cluster.run(sys.executable, "-m", "resilient.cli", "launch", str(config), timeout=120)
    first = out.stdout.splitlines()[0]
    assert first.startswith("submitted job "), out.stdout
    return first.removeprefix("submitted job ")


def last_step(run_dir: Path) -> int:
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def digest(run_dir: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "ckpt", "digest", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == f"step {STEPS}", out.stdout
    return lines[1]


def logs(run_dir: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((run_dir / "logs").glob("*.out")))


def finished_job(cluster: Cluster, job_id: str, run_dir: Path, timeout: float = 300) -> dict[str, str]:
    job = cluster.wait_job(job_id, DONE, timeout=timeout)
    assert job["JobState"] == "COMPLETED", f"{job}\n{logs(run_dir)}"
    return job


def supervisor_process(job_id: str, slot: int) -> psutil.Process | None:
    """The `resilient supervise` process of `slot` in job `job_id` (every node's processes are on this host):
    the step's task, not the batch script's srun (same command line and job environment)."""
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline, env = proc.info["cmdline"] or [], proc.environ()
            if (
                "supervise" in cmdline
                and "srun" not in cmdline[0]
                and env.get("SLURM_JOB_ID") == job_id
                and env.get("SLURM_NODEID") == str(slot)
                and env.get("SLURM_STEP_ID") == "0"
            ):
                return proc
        except psutil.Error:
            continue
    return None


def rank_process(job_id: str, rank: int, slots: int = 3) -> psutil.Process | None:
    """The live (not parked) process of global rank `rank` in job `job_id`."""
    for slot in range(slots):
        sup = supervisor_process(job_id, slot)
        for child in sup.children() if sup else []:
            try:
                if not is_parked(child.pid) and child.environ().get("RANK") == str(rank):
                    return child
            except psutil.Error:
                continue
    return None
