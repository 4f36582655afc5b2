"""Whole runs on the local cluster: `resilient launch` -> sbatch -> srun -> one supervisor per node -> trainer.

Tiny model, one rank per node, a few steps; each run takes well under a minute plus Slurm's
requeue delay (cred_expire=10 s in deploy/slurm/slurm.conf.in).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest
import yaml

from resilient.core import secret
from resilient.core.exit_codes import ExitCode
from tests.ranks import resilient_cli, run_ranks
from tests.slurm.runs import (
    FAILED_GPU,
    STEPS,
    digest,
    finished_job,
    last_step,
    launch,
    logs,
    supervisor_process,
    write_run_config,
)
from tests.supervisor.harness import events, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_two_node_tiny_run_completes(reference):
    run_dir, job, _ = reference
    assert job["Restarts"] == "0" and job["NodeList"] == "n[0-1]"
    starts = events(run_dir, "run_start")
    assert sorted(r["node"] for r in starts) == [0, 1]
    assert {r["slurm_job_id"] for r in starts} == {job["JobId"]}
    assert events(run_dir, "finished")[-1]["step"] == STEPS
    end = events(run_dir, "job_end")
    assert [(e["state"], e["job_id"], e["slurm_restart_count"]) for e in end] == [("finished", job["JobId"], 0)]
    assert last_step(run_dir) == STEPS


# srun passes the forwarded signal to every process of the step, ranks included, so the ranks
# must treat it as a stop request too: the trainer handles the configured preemption signal.
@pytest.mark.parametrize("sig", ["USR2"])  # the template's default --signal
def test_preemption_signal_saves_requeues_and_resumes_to_the_same_weights(slurm_cluster, reference, tmp_path, sig):
    config, run_dir = write_run_config(tmp_path, "preempted")
    tree = yaml.safe_load(config.read_text())
    tree["supervisor"]["preempt_signal"] = f"SIG{sig}"
    config.write_text(yaml.safe_dump(tree))
    job_id = launch(slurm_cluster, config)
    wait_until(lambda: last_step(run_dir) >= 3, 240, "training to reach step 3")
    config_before = (run_dir / "config.yaml").read_bytes()
    again = slurm_cluster.run(sys.executable, "-m", "resilient.cli", "launch", str(config), timeout=120, check=False)
    assert again.returncode == ExitCode.RUN_DIR_BUSY and f"active job {job_id}" in again.stderr, again.stderr
    assert (run_dir / "config.yaml").read_bytes() == config_before
    slurm_cluster.run("scancel", f"--signal={sig}", "--batch", job_id)

    job = finished_job(slurm_cluster, job_id, run_dir)
    assert job["Restarts"] == "1"
    preempted = {r["step"] for r in events(run_dir, "preempted")}
    assert len(preempted) == 1, preempted
    saved = preempted.pop()
    assert 3 <= saved < STEPS
    assert [c["step"] for c in events(run_dir, "ckpt_save")].count(saved) == 1
    requeue = events(run_dir, "requeue")
    assert [(r["cause"], r["exit_code"], r["exclude"], r["slurm_restart_count"]) for r in requeue] == [
        ("preempted", 75, [], 0)
    ]
    second = [r for r in events(run_dir, "run_start") if r["slurm_restart_count"] == 1]
    assert sorted(r["node"] for r in second) == [0, 1]
    loads = [r for r in events(run_dir, "ckpt_load") if r["ts"] > requeue[0]["ts"]]
    assert loads and {r["step"] for r in loads} == {saved}, "the second allocation resumes at the saved step"
    assert events(run_dir, "job_end")[-1]["state"] == "finished"
    assert digest(run_dir) == reference[2], "resumed run must end with the uninterrupted run's weights"


def test_unhealthy_node_is_excluded_drained_and_the_run_finishes_on_the_other(slurm_cluster, alert_watch, tmp_path):
    """n1's GPU is lost: the job requeues without n1 and finishes on n0, and Prometheus (15 s scrape) still
    alerts on n1 from the node facts its supervisor left for node_exporter."""
    config, run_dir = write_run_config(tmp_path, "unhealthy", min_nodes=1, drain_bad_nodes=True)
    tree = yaml.safe_load(config.read_text())
    tree["metrics"]["textfile_dir"] = str(alert_watch.textfile_dir)  # node_exporter's, as on every cluster node
    config.write_text(yaml.safe_dump(tree))
    (tmp_path / "unhealthy-nvml" / "n1.json").write_text(json.dumps(FAILED_GPU))
    job_id = launch(slurm_cluster, config)
    try:
        job = finished_job(slurm_cluster, job_id, run_dir)
        node = slurm_cluster.run("scontrol", "-o", "show", "node", "n1").stdout
        assert "DRAIN" in node and "Reason=resilient:" in node, node
    finally:
        slurm_cluster.run("scontrol", "update", "NodeName=n1", "State=RESUME", check=False)

    assert job["Restarts"] == "1" and job["NodeList"] == "n0" and job["ExcNodeList"] == "n1"
    requeue = events(run_dir, "requeue")
    assert [(r["cause"], r["exclude"], r["nodes"], r["drained"]) for r in requeue] == [
        ("unhealthy_node", ["n1"], 1, ["n1"])
    ]
    assert any(h["node"] == "n1" and h["severity"] == "fatal" for h in events(run_dir, "health"))
    assert [r["node"] for r in events(run_dir, "run_start") if r["slurm_restart_count"] == 1] == [0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["nodes"] == 1
    assert events(run_dir, "finished")[-1]["step"] == STEPS
    assert events(run_dir, "job_end")[-1]["state"] == "finished"
    # The job has moved on and finished without n1; the alerts still name it, firing now.
    unhealthy = alert_watch.wait_firing("ResilientNodeUnhealthy", 120, now=True, node="n1")
    assert unhealthy["labels"]["check"] == "gpu.lost" and "gpu.lost" in unhealthy["labels"]["reason"]
    alert_watch.wait_firing("ResilientGpuLost", 60, now=True, node="n1", gpu="0")
    assert not alert_watch.seen("ResilientNodeUnhealthy", node="n0")


def test_losing_node0s_supervisor_stops_every_node_and_requeues(slurm_cluster, tmp_path):
    """Node 0 hosts the coordination store: when its supervisor dies, node 1 stops its ranks, records
    `coordinator_lost`, finds no majority for an election (1 of 2) and exits COORDINATOR_LOST; the job
    requeues itself and finishes."""
    config, run_dir = write_run_config(tmp_path, "node0-lost")
    job_id = launch(slurm_cluster, config)
    wait_until(lambda: last_step(run_dir) >= 3, 240, "training to reach step 3")
    node0 = wait_until(lambda: supervisor_process(job_id, 0), 30, "node 0's supervisor")
    node0.kill()

    job = finished_job(slurm_cluster, job_id, run_dir)
    assert job["Restarts"] == "1"
    lost = events(run_dir, "coordinator_lost")
    # found by node 1's next store call or by its lease renewal, whichever comes first
    assert lost[0]["node"] == 1 and re.search(
        r"coordination store at \S+ lost|coordinator slot 0 lost: lease renewal failed", lost[0]["reason"]
    ), lost[0]["reason"]
    assert lost[-1]["minority"]  # one of two supervisors is no majority: no election, it stops
    assert [r["cause"] for r in events(run_dir, "requeue")] == ["crash"]
    assert "exit 83: lost the job's coordination" in logs(run_dir)
    assert events(run_dir, "job_end")[-1]["state"] == "finished" and last_step(run_dir) == STEPS


MEMORY_EVERY = 5


def test_losing_node1_and_its_memory_resumes_from_node0s_replica(slurm_cluster, reference, tmp_path):
    """Every process of node 1 (supervisor and ranks) is killed and its shared memory is
    gone (both nodes share this host: removing node1/ simulates it). The requeued job resumes from the
    replica node 0 holds for node 1, losing at most a memory interval (plus the one being committed),
    and ends on the fault-free run's weights. (With no replica left the same loss resumes from disk: the tier
    choice and a damaged snapshot falling back to disk are checked in test_memory_tier.py, without a cluster.)"""
    from resilient.core.secret import RunKey
    from trainer.checkpoint.config import CheckpointConfig

    config, run_dir = write_run_config(tmp_path, "memtier")
    tree = yaml.safe_load(config.read_text())
    tree["checkpoint"]["memory_interval_steps"] = MEMORY_EVERY  # memory 5, 10, 15, 20; disk 8, 16, 24
    # node 0 finds node 1's lease expired within node_lease_s, stops (no spare) and the job requeues
    config.write_text(yaml.safe_dump(tree))
    job_id, root = launch(slurm_cluster, config), None
    try:
        wait_until(lambda: (run_dir / ".secret").exists(), 120, "the run's secret")
        root = CheckpointConfig().memory_root(run_dir, RunKey.of(run_dir))  # named from the run's secret
        # the disk save of step 8 commits in the background: it may come after memory step 10 (CI once)
        wait_until(
            lambda: (
                (root / "node0/replica/node1/step_0000010/COMMITTED").exists() and list(events(run_dir, "ckpt_save"))
            ),
            300,
            "node 1's step-10 snapshot replicated to node 0, and a disk checkpoint committed",
        )
        node1 = wait_until(lambda: supervisor_process(job_id, 1), 30, "node 1's supervisor")
        victims = [node1, *node1.children(recursive=True)]
        for proc in victims:
            proc.kill()
        reached = last_step(run_dir)
        shutil.rmtree(root / "node1")
        killed_at = max((r["ts"] for r in events(run_dir, "ckpt_load")), default=0)

        finished_job(slurm_cluster, job_id, run_dir, timeout=900)
        load = next(r for r in events(run_dir, "ckpt_load") if r["ts"] > killed_at)
        disk = max(r["step"] for r in events(run_dir, "ckpt_save") if r["ts"] < load["ts"])
        assert load["tier"] == "memory-replica" and load["sources"] == ["own", "replica@0"], load
        assert load["step"] > disk and load["step"] % MEMORY_EVERY == 0
        assert reached - load["step"] <= 2 * MEMORY_EVERY, (reached, load)
        assert digest(run_dir) == reference[2], "the resumed run ends on the fault-free run's weights"
        assert not root.exists(), "a finished run leaves nothing in /dev/shm"
    finally:
        slurm_cluster.run("scancel", job_id, check=False)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def test_silent_data_corruption_removes_the_suspect_node_and_ends_on_the_fault_free_bits(
    slurm_cluster, reference, tmp_path
):
    """Silent data corruption on the cluster: one rank per node (two replicas), a weight bit flipped in node 1's
    rank at step 10. The check at step 12 finds the replicas apart; both re-execute from step 8 and rank 1 alone
    does not reproduce its own token losses at step 10: sdc_confirmed names it and n1, its ranks exit
    UNHEALTHY_NODE, and `slurm on-exit` requeues the job without n1 (shrinking to one node). The run resumes
    from step 8 and ends on the fault-free bits of that history: the uninterrupted two-node run's step 8,
    continued on one rank."""
    config, run_dir = write_run_config(tmp_path, "sdc", min_nodes=1)
    tree = yaml.safe_load(config.read_text())
    tree["numerics"] = {"replica_check_interval_steps": 4}
    config.write_text(yaml.safe_dump(tree))
    run_dir.mkdir(mode=0o700)
    (run_dir / "faults.json").write_text(json.dumps({"bitflip": [{"step": 10, "rank": 1, "attempt": 0}]}))
    job = finished_job(slurm_cluster, launch(slurm_cluster, config), run_dir, timeout=900)
    assert job["Restarts"] == "1" and job["NodeList"] == "n0" and job["ExcNodeList"] == "n1"
    [found] = events(run_dir, "sdc_confirmed")
    assert (found["step"], found["ranks"], found["nodes"], found["how"], found["action"]) == (
        12,
        [1],
        ["n1"],
        "re-execution",
        "remove",
    )
    requeues = [(r["cause"], r["exclude"], r["nodes"]) for r in events(run_dir, "requeue")]
    assert requeues == [("unhealthy_node", ["n1"], 1)]
    resumed = next(e["step"] for e in events(run_dir, "ckpt_load") if e["ts"] > found["ts"])
    assert resumed == 8 <= found["trusted_until"]

    clean = tmp_path / "clean"
    (clean / "checkpoints").mkdir(parents=True, mode=0o700)
    shutil.copytree(reference[0] / "checkpoints" / "step_0000008", clean / "checkpoints" / "step_0000008")
    secret.load_or_create(clean)  # another run's checkpoint: this run adopts it on purpose, as an operator would
    adopt = resilient_cli("ckpt", "adopt", str(clean))
    assert adopt.returncode == 0 and "step 8: adopted by run" in adopt.stdout, adopt.stdout + adopt.stderr
    # the same intra-op threads as the requeued job's single rank: the environment's, else the host's cores
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    assert run_ranks(clean, ["supervisor.nproc_per_node=1"], world=1, config=config, extra_env=threads) == [0]
    assert digest(run_dir) == digest(clean)
