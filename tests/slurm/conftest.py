"""The local two-node Slurm cluster (deploy/slurm/cluster.sh), one per test session."""

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

    def wait_job(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.get("JobState") in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {job.get('JobState')} after {timeout:.0f}s: {job}")
            time.sleep(1)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    why = slurm_missing()
    if why:
        pytest.fail(f"{why}: run scripts/setup.sh --test")
    state = tmp_path_factory.mktemp("slurm-cluster")
    start = subprocess.run([str(CLUSTER_SH), "start", str(state)], capture_output=True, text=True, timeout=180)
    cluster = Cluster(state)
    try:
        assert start.returncode == 0, f"cluster.sh start failed: {start.stderr.strip()}"
        yield cluster
    finally:
        subprocess.run([str(CLUSTER_SH), "stop", str(state)], capture_output=True, text=True, timeout=120)
