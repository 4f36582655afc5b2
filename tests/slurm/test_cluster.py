"""The local cluster itself: both nodes up, a two-node batch job runs, start is idempotent."""

import subprocess

import pytest

from tests.slurm.conftest import CLUSTER_SH

pytestmark = pytest.mark.slurm


def test_cluster_has_two_idle_nodes_and_start_is_idempotent(slurm_cluster):
    out = slurm_cluster.run("sinfo", "-h", "-N", "-p", "main", "-o", "%N %t").stdout.split("\n")
    assert sorted(line for line in out if line) == ["n0 idle", "n1 idle"]
    again = subprocess.run(
        [str(CLUSTER_SH), "start", str(slurm_cluster.state_dir)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0 and "n0=idle n1=idle" in again.stdout
    status = subprocess.run(
        [str(CLUSTER_SH), "status", str(slurm_cluster.state_dir)], capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0 and status.stdout.count(": running") == 4


def test_two_node_batch_job_runs_one_task_per_node(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo task $SLURM_NODEID on $SLURMD_NODENAME of $SLURM_NNODES'\n")
    out = tmp_path / "hello.out"
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", "-N", "2", "--ntasks-per-node=1", f"--output={out}", str(script)
    ).stdout.strip()
    job = slurm_cluster.wait_job(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    assert job["JobState"] == "COMPLETED", job
    lines = sorted(out.read_text().split("\n"))
    assert [line for line in lines if line] == ["task 0 on n0 of 2", "task 1 on n1 of 2"]
