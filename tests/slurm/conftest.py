"""The local Slurm clusters (deploy/slurm/cluster.sh): two nodes for the session; three nodes, each in its own
network namespace, for the node-loss tests (tests/slurm/test_node_loss.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "deploy" / "slurm" / "cluster.sh"


def slurm_missing() -> str | None:
    for tool in ("slurmctld", "slurmd", "munged", "sbatch"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if os.geteuid() != 0:
        return "the local cluster runs slurmd, which needs root"
    return None


class Cluster:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.conf = state_dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {out.returncode}: {out.stderr.strip()}")
        return out

    def job(self, job_id: str) -> dict[str, str]:
        fields: dict[str, str] = {}
        for token in self.run("scontrol", "-o", "show", "job", job_id).stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def node(self, action: str, node: str) -> str:
        """cluster.sh freeze|thaw|cut|heal|pids NODE."""
        out = subprocess.run(
            [str(CLUSTER_SH), action, str(self.state_dir), node], capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise AssertionError(f"cluster.sh {action} {node}: {out.stderr.strip()}")
        return out.stdout

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job.get('JobState')} after {timeout:.0f}s: {job}")
            time.sleep(1)


def start_cluster(state: Path, nodes: int = 2, netns: bool = False):
    """Start a cluster in `state` (a generator: yields it, stops it)."""
    why = slurm_missing()
    if why:
        pytest.fail(f"{why}: run scripts/setup.sh --test")
    env = {**os.environ, "CLUSTER_NODES": str(nodes), "CLUSTER_NETNS": "1" if netns else "0"}
    start = subprocess.run([str(CLUSTER_SH), "start", str(state)], capture_output=True, text=True, timeout=180, env=env)
    cluster = Cluster(state)
    try:
        assert start.returncode == 0, f"cluster.sh start failed: {start.stderr.strip()}"
        yield cluster
    finally:
        subprocess.run([str(CLUSTER_SH), "stop", str(state)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    yield from start_cluster(tmp_path_factory.mktemp("slurm-cluster"))


@pytest.fixture(scope="session")
def reference(slurm_cluster, tmp_path_factory):
    """An uninterrupted two-node run: (run dir, job record, final checkpoint digest). Session-wide: every
    disturbed run of the same training ends on its digest (test_end_to_end.py, test_node_loss.py)."""
    from tests.slurm.runs import digest, finished_job, launch, write_run_config

    config, run_dir = write_run_config(tmp_path_factory.mktemp("reference"), "reference")
    job_id = launch(slurm_cluster, config)
    job = finished_job(slurm_cluster, job_id, run_dir)
    return run_dir, job, digest(run_dir)
