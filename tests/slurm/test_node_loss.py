"""On a real three-node Slurm cluster, each node a host of its own (network namespace, address,
/dev/shm): `nodes: 2`, `slurm.spare_nodes: 1`. A node that fails is replaced in the same Slurm job by the
spare, which takes its node rank and loads its state from the peer replica; the run ends on the fault-free
run's weights (the session's two-node reference run: the same training), and the bad node is in the ledger
and in `resilient status`.

Runs (each shared by the faults the issue allows in one job; a spare covers one node fault):
  - warm: a rank killed three times, 3 s after each recovery (every recovery warm: three spares per rank,
    each one's imports done), then (a) a fatal health verdict on node 1;
  - frozen: (b) every process of node 1 frozen, then node 1 thawed and, with no spare left, a fatal verdict
    on the spare that replaced it: the requeue path as before (without that node), nothing lost;
  - cut: (c) node 1's link cut (no FIN, no RST);
  - coordinator: (d) node 0's supervisor, ranks and spares frozen (its slurmd and the batch shell live on).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.slurm.conftest import Cluster, start_cluster
from tests.slurm.runs import (
    FAILED_GPU,
    digest,
    finished_job,
    last_step,
    launch,
    rank_process,
    write_run_config,
)
from tests.slurm.runs import supervisor_process as supervisor
from tests.supervisor.harness import events, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

MEMORY_EVERY = 2
NODES = ("n0", "n1", "n2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from start_cluster(tmp_path_factory.mktemp("slurm-3"), nodes=3, netns=True)


def write_config(tmp: Path, name: str, supervisor: dict | None = None, **slurm) -> tuple[Path, Path]:
    """The reference's training (tests/slurm/runs.py) on two nodes plus a spare; memory snapshots every few
    steps, replicated to the next node, and disk only at the end: every restart takes a memory snapshot, so a
    replacement must fetch the lost node's copy from its peer."""
    return write_run_config(
        tmp,
        name,
        hosts=NODES,
        spare_nodes=1,
        time_limit_minutes=15,
        **slurm,
        sections={
            "checkpoint": {"interval_steps": 1000, "memory_interval_steps": MEMORY_EVERY},
            "supervisor": {"node_lease_s": 4.0, **(supervisor or {})},
            "health": {"monitor_interval_s": 1.0},
        },
    )


def finished(cluster: Cluster, job_id: str, run_dir: Path, timeout: float = 600) -> dict[str, str]:
    job = finished_job(cluster, job_id, run_dir, timeout)
    assert events(run_dir, "job_end")[-1]["state"] == "finished"
    return job


def status(run_dir: Path) -> tuple[dict, str]:
    """`resilient status` as JSON and as the operator reads it."""

    def run(*extra: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "resilient.cli", "status", str(run_dir), *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    return json.loads(run("--json")), run()


def attempts_started(run_dir: Path) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for record in events(run_dir, "attempt_start"):
        out.setdefault(record["attempt"], []).append(record)
    return out


def stepping_in(run_dir: Path, attempt: int, beyond: int = 0):
    """Probe: attempt `attempt` completed a step beyond `beyond` (the train log records each step's attempt)."""

    def probe() -> bool:
        path = run_dir / "train_log.jsonl"
        if not path.exists():
            return False
        for line in path.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if row.get("attempt") == attempt and row.get("step", 0) > beyond:
                return True
        return False

    return probe


def spare_stepping(run_dir: Path):
    """Probe: the spare (n2) runs a node rank and its attempt completed a step."""

    def probe() -> bool:
        started = [r["attempt"] for r in events(run_dir, "attempt_start") if r["host"] == "n2"]
        return bool(started) and stepping_in(run_dir, started[0])()

    return probe


def snapshot_since(run_dir: Path, ts: float):
    """Probe: a memory snapshot (replicated to the next node) was committed after `ts`."""
    return lambda: [r for r in events(run_dir, "mem_snapshot") if r["ts"] > ts and r["step"] > 0]


def assert_same_job_on_the_spare(run_dir: Path, ended: dict, bad: str, kind: str) -> None:
    """The fault was survived in the same Slurm job: no Slurm restart, the spare (which stood by until then)
    took the bad node's rank."""
    assert ended["Restarts"] == "0"
    assert [r["host"] for r in events(run_dir, "run_start") if r["role"] == "spare"] == ["n2"]
    assert {r["slurm_restart_count"] for r in events(run_dir, "run_start")} == {0}
    [out] = [r for r in events(run_dir, "bad_node") if r["node"] == bad]
    assert out["kind"] == kind and out["replaced_by"] == "n2" and out["node_rank"] in (0, 1), out
    final = max(attempts_started(run_dir))
    assert {(r["node"], r["host"]) for r in attempts_started(run_dir)[final]} == {
        (out["node_rank"], "n2"),
        (1 - out["node_rank"], ({"n0", "n1"} - {bad}).pop()),
    }
    got, shown = status(run_dir)
    assert got["bad_nodes"][bad]["kind"] == kind and got["roster"]["spares"] == [] and bad in got["roster"]["out"]
    assert f"bad node {bad}: {kind} x1" in shown and "spare nodes: none left" in shown


def assert_replica_loaded(run_dir: Path, sources: list[str]) -> None:
    """The spare's restart took the newest memory snapshot, the lost node's copy from its peer replica."""
    load = events(run_dir, "ckpt_load")[-1]
    assert load["tier"] == "memory-replica" and load["sources"] == sources, load


@contextlib.contextmanager
def held(job_id: str):
    """Ranks 0 and 1 of the job stopped (SIGSTOP) for the block, then continued (those still alive)."""
    procs = [p for p in (rank_process(job_id, rank) for rank in (0, 1)) if p is not None]
    for proc in procs:
        proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def job(cluster: Cluster, config: Path, resume: str | None = None):
    """The job of `config`, killed after the block (a plain scancel would requeue it); the nodes `resume`
    (a Slurm node list) are back in service after it."""
    job_id = launch(cluster, config)
    try:
        yield job_id
    finally:
        cluster.run("scancel", "--full", "--signal=KILL", job_id, check=False)
        if resume is not None:
            cluster.run("scontrol", "update", f"NodeName={resume}", "State=RESUME", check=False)


def silenced_until_replaced(cluster: Cluster, run_dir: Path, fault: str, repair: str) -> None:
    """Once node 0 holds a replica of node 1's memory snapshot, node 1 goes silent by `fault` until the spare
    steps in its place (then `repair`)."""
    wait_until(snapshot_since(run_dir, 0), 300, "a replicated snapshot")
    cluster.node(fault, "n1")
    try:
        wait_until(spare_stepping(run_dir), 300, "node 1 replaced by the spare, stepping")
    finally:
        cluster.node(repair, "n1")


def spares_warm(run_dir: Path, hosts: tuple[str, ...]):
    """Probe: every parked spare of `hosts` finished its imports (status.json, as `resilient status` shows)."""

    def probe() -> bool:
        try:
            spares = json.loads((run_dir / "status.json").read_text()).get("spares") or {}
        except (OSError, ValueError):
            return False
        return all((s := spares.get(h)) and s["count"] and s["warm"] == s["count"] for h in hosts)

    return probe


def test_rank_kills_recover_warm_and_an_unhealthy_node_is_replaced_by_the_spare(cluster, reference, tmp_path):
    # three spares per rank: a burst of three failures inside one refill (replacements are refilled only
    # after a restart, and import at idle priority next to ranks that keep both cores busy) is warm throughout
    config, run_dir = write_config(tmp_path, "warm", supervisor={"spares_per_rank": 3})
    with job(cluster, config) as job_id:
        # (e) rank 1 killed three times, each 3 s after the previous recovery completed a step
        wait_until(lambda: last_step(run_dir) >= 3, 300, "training to reach step 3")
        # A long run's spares are warm long before its first failure; this one is 24 steps long, and its ranks
        # keep both cores busy, which starves the spares' idle-priority imports. So the ranks are held
        # (stopped, well inside the step timeout) until every spare of the running nodes is warm, and during
        # each 3 s wait and the verdict below, so that the run is still training when each fault comes.
        with held(job_id):
            wait_until(spares_warm(run_dir, ("n0", "n1")), 120, "the running nodes' spares warm")
        for kill in range(3):
            attempt = max(attempts_started(run_dir))
            rank_process(job_id, 1).send_signal(signal.SIGKILL)
            wait_until(stepping_in(run_dir, attempt + 1), 180, f"recovery {kill + 1} stepping")
            with held(job_id):
                time.sleep(3.0)
        started = attempts_started(run_dir)
        for attempt in sorted(started)[1:4]:
            # every rank went to a spare that had finished its imports
            assert sorted((r["spare_ranks"], r["warm_ranks"]) for r in started[attempt]) == [(1, 1)] * 2, started
        # (a) a fatal health verdict on node 1, once node 0 holds a replica of its memory snapshot
        wait_until(snapshot_since(run_dir, events(run_dir, "restart")[-1]["ts"]), 300, "a replicated snapshot")
        with held(job_id):
            (tmp_path / "warm-nvml" / "n1.json").write_text(json.dumps(FAILED_GPU))
            wait_until(lambda: events(run_dir, "bad_node"), 120, "node 1 replaced")
        ended = finished(cluster, job_id, run_dir)
    assert_same_job_on_the_spare(run_dir, ended, "n1", "unhealthy")
    assert any(h["node"] == "n1" and h["severity"] == "fatal" for h in events(run_dir, "health"))
    assert_replica_loaded(run_dir, ["own", "replica@0"])  # node 1's state from node 0, which keeps its replica
    assert digest(run_dir) == reference[2], "the run ends on the fault-free run's weights"


def test_a_frozen_node_is_replaced_in_seconds_then_with_no_spare_left_the_job_requeues(cluster, reference, tmp_path):
    config, run_dir = write_config(tmp_path, "frozen")
    with job(cluster, config, resume="n1,n2") as job_id:
        silenced_until_replaced(cluster, run_dir, "freeze", "thaw")  # (b) slurmd, step daemon, supervisor, ranks
        [lost] = [f for f in events(run_dir, "failure") if f["kind"] == "node_lost"]
        assert lost["node"] == 1 and "lease not renewed" in lost["reason"]
        replaced = events(run_dir, "bad_node")[0]["ts"]
        load = [r for r in events(run_dir, "ckpt_load") if r["ts"] > replaced][0]
        assert load["tier"] == "memory-replica" and load["sources"] == ["own", "replica@0"], load
        assert {r["slurm_restart_count"] for r in events(run_dir, "run_start")} == {0}
        # no spare left: node rank 1 (now on n2) found unfit ends the allocation as before, without n2
        replaced_at = last_step(run_dir)
        wait_until(lambda: last_step(run_dir) >= replaced_at + 2, 180, "progress on the spare")
        with held(job_id):  # the run is still training when the verdict comes (steps are fast here)
            (tmp_path / "frozen-nvml" / "n2.json").write_text(json.dumps(FAILED_GPU))
            wait_until(lambda: events(run_dir, "requeue"), 180, "the requeue")
        ended = finished(cluster, job_id, run_dir, timeout=900)
    [requeue] = events(run_dir, "requeue")
    assert (requeue["cause"], requeue["exclude"], requeue["nodes"]) == ("unhealthy_node", ["n2"], 2)
    assert ended["Restarts"] == "1" and ended["ExcNodeList"] == "n2" and ended["NodeList"] == "n[0-1]"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["slurm"]["spare_nodes"] == 0
    load = [r for r in events(run_dir, "ckpt_load") if r["ts"] > requeue["ts"]][0]
    saved = max(r["step"] for r in events(run_dir, "mem_snapshot") if r["ts"] < requeue["ts"])
    assert load["step"] == saved, (load, saved)  # nothing committed was lost
    assert digest(run_dir) == reference[2]


def test_a_node_cut_off_without_fin_or_rst_is_replaced(cluster, reference, tmp_path):
    config, run_dir = write_config(tmp_path, "cut")
    with job(cluster, config, resume="n1") as job_id:
        silenced_until_replaced(cluster, run_dir, "cut", "heal")  # (c)
        ended = finished(cluster, job_id, run_dir)
    assert_same_job_on_the_spare(run_dir, ended, "n1", "lost")
    assert_replica_loaded(run_dir, ["own", "replica@0"])
    # the cut-off side had no majority: it stopped without deciding anything
    minority = [r for r in events(run_dir, "coordinator_lost") if r.get("minority")]
    assert [r["node"] for r in minority] == [1] and not [r for r in events(run_dir, "gave_up")]
    assert digest(run_dir) == reference[2]


def test_losing_the_coordinator_elects_another_and_the_spare_takes_node_0(cluster, reference, tmp_path):
    config, run_dir = write_config(tmp_path, "coordinator")
    with job(cluster, config) as job_id:
        wait_until(snapshot_since(run_dir, 0), 300, "a replicated snapshot")
        node0 = supervisor(job_id, 0)
        frozen = [node0, *node0.children(recursive=True)]  # (d) its slurmd and the batch shell live on
        for proc in frozen:
            proc.send_signal(signal.SIGSTOP)
        ended = finished(cluster, job_id, run_dir)
    [elected] = events(run_dir, "elected")
    assert (elected["slot"], elected["epoch"], elected["lost"]) == (1, 1, 0)
    [fence] = events(run_dir, "fence")
    assert fence["node"] == "n0" and fence["ok"] and fence["pid"] == node0.pid
    assert not psutil.pid_exists(node0.pid) or psutil.Process(node0.pid).status() == psutil.STATUS_ZOMBIE
    assert_same_job_on_the_spare(run_dir, ended, "n0", "lost")
    assert_replica_loaded(run_dir, ["replica@1", "own"])  # node 0's state from node 1, which keeps its replica
    assert events(run_dir, "finished")[-1]["epoch"] == 1
    assert digest(run_dir) == reference[2]
