"""Node-loss benchmark on a local three-node Slurm cluster (one network namespace, address and /dev/shm per
node): failure -> next completed step, p50/p95 over several trials per fault.

    python bench/node_loss/run.py [--trials 5] [--faults rank unhealthy frozen cut coordinator requeue]
                                  [--out bench/results/node_loss.json]

Every trial is a job of its own (`nodes: 2`, `slurm.spare_nodes: 1`, the tiny model, one rank per node, a
memory snapshot every 2 steps replicated to the next node, one intra-op thread per rank): it trains until a
snapshot is replicated and every node's spares are warm, then
  rank         SIGKILL of rank 1, then again 3 s after the recovery completed a step ("rank" is the first
               recovery, "rank_3s" the second: a failure seconds after a restart);
  cold         the same first kill with `supervisor.warm_spares=false` (every rank a new interpreter);
  unhealthy    (a) a fatal health verdict on node 1 (the fake NVML says its GPU is lost);
  frozen       (b) every process of node 1 stopped (SIGSTOP: slurmd, step daemon, supervisor, ranks);
  cut          (c) node 1's link down (no FIN, no RST);
  coordinator  (d) node 0's supervisor, ranks and spares stopped (its slurmd and the batch shell live on);
  requeue      the path without a spare (`spare_nodes: 0`): a fatal verdict on node 1 ends the allocation,
               `slurm on-exit` requeues without it, the next allocation resumes;
and measures, from the fault to the first step completed after it (train_log.jsonl), `recover_s`, and for
the silent faults the time until the coordinator (or, for (d), a survivor) noticed (`detect_s`). The job is
cancelled once the measurement is in. Prints a table with p50/p95 and the issue's goals (GOALS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from resilient.core import ledger  # noqa: E402
from tests.slurm.runs import FAILED_GPU, rank_process, supervisor_process, write_run_config  # noqa: E402
from tests.supervisor.harness import events, wait_until  # noqa: E402

CLUSTER_SH = REPO / "deploy" / "slurm" / "cluster.sh"
FAULTS = ["rank", "cold", "unhealthy", "frozen", "cut", "coordinator", "requeue"]
GOALS = [
    ("silent node detected <= 5 s", lambda r: r["frozen"]["detect_s"]["p95"] <= 5.0),
    (  # a silent node: from the moment it was noticed (noticing it is the goal above)
        "node replacement <= 3x the rank restart (p50; unhealthy, and frozen once noticed)",
        lambda r: (
            max(r["unhealthy"]["recover_s"]["p50"], r["frozen"]["replace_s"]["p50"])
            <= 3 * r["rank"]["recover_s"]["p50"]
        ),
    ),
    ("node 0's supervisor loss survived in-job", lambda r: r["coordinator"]["same_job"] == r["coordinator"]["n"]),
    (
        "a failure 3 s after a restart <= 0.3x a cold start (p50)",
        lambda r: r["rank"]["rank_3s_s"]["p50"] <= 0.3 * r["cold"]["recover_s"]["p50"],
    ),
]


class Cluster:
    def __init__(self, state: Path) -> None:
        # One intra-op thread per rank: the three nodes share this machine's cores, where each would have
        # its own (the supervisor's default, cores / local ranks, counts every core as the node's).
        self.state = state
        self.env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"), "OMP_NUM_THREADS": "1"}

    def start(self) -> None:
        env = {**self.env, "CLUSTER_NODES": "3", "CLUSTER_NETNS": "1"}
        subprocess.run(
            [str(CLUSTER_SH), "start", str(self.state)], check=True, env=env, capture_output=True, timeout=300
        )

    def stop(self) -> None:
        subprocess.run([str(CLUSTER_SH), "stop", str(self.state)], env=self.env, capture_output=True, timeout=300)

    def sh(self, action: str, node: str) -> None:
        subprocess.run([str(CLUSTER_SH), action, str(self.state), node], check=True, capture_output=True, timeout=60)

    def slurm(self, *argv: str) -> str:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=120).stdout

    def resume(self) -> None:
        self.slurm("scontrol", "update", "NodeName=n[0-2]", "State=RESUME")


def write_config(tmp: Path, name: str, *, spares: int, warm: bool = True) -> tuple[Path, Path]:
    """The Slurm tests' training (tests/slurm/runs.py), long enough for every trial, on two nodes plus
    `spares`; memory snapshots every 2 steps replicated to the next node, disk only at the end."""
    return write_run_config(
        tmp,
        name,
        hosts=("n0", "n1", "n2"),
        spare_nodes=spares,
        time_limit_minutes=30,
        max_crash_requeues=0,
        sections={
            "train": {"steps": 5000},
            "checkpoint": {"interval_steps": 100000, "memory_interval_steps": 2},
            "supervisor": {"warm_spares": warm},
            "health": {"monitor_interval_s": 1.0},
        },
    )


def steps(run_dir: Path) -> list[dict]:
    return list(ledger.read_jsonl(run_dir / "train_log.jsonl"))


def spares_warm(run_dir: Path, nodes: int) -> bool:
    """The parked spares of all `nodes` nodes finished their imports (status.json), as in a run hours old."""
    try:
        spares = json.loads((run_dir / "status.json").read_text()).get("spares") or {}
    except (OSError, ValueError):
        return False
    return len(spares) == nodes and all(s and s["count"] and s["warm"] == s["count"] for s in spares.values())


def first_step_after(run_dir: Path, t0: float) -> float | None:
    """Wall time of the first step any rank completed after `t0` in an attempt that started after `t0`."""
    later = {e["attempt"] for e in events(run_dir, "attempt_start") if e["ts"] > t0}
    done = [s["ts"] for s in steps(run_dir) if s.get("attempt") in later and s.get("step") is not None]
    return min(done, default=None)


def launch(cluster: Cluster, config: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "launch", str(config)],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    if not out.stdout.startswith("submitted job "):
        raise RuntimeError(out.stderr)
    return out.stdout.split()[2]


def trial(cluster: Cluster, tmp: Path, fault: str, n: int) -> dict[str, Any]:
    spares = 0 if fault == "requeue" else 1
    config, run_dir = write_config(tmp, f"{fault}{n}", spares=spares, warm=fault != "cold")
    job = launch(cluster, config)
    out: dict[str, Any] = {"fault": fault, "trial": n}
    try:
        wait_until(lambda: [e for e in events(run_dir, "mem_snapshot") if e["step"] >= 2], 600, "a replicated snapshot")
        if fault != "cold":
            wait_until(lambda: spares_warm(run_dir, 2 + spares), 600, "warm spares on every node")
        t0 = time.time()
        if fault in ("rank", "cold"):
            rank_process(job, 1).send_signal(signal.SIGKILL)
        elif fault in ("unhealthy", "requeue"):
            (tmp / f"{fault}{n}-nvml" / "n1.json").write_text(json.dumps(FAILED_GPU))
        elif fault == "frozen":
            cluster.sh("freeze", "n1")
        elif fault == "cut":
            cluster.sh("cut", "n1")
        elif fault == "coordinator":
            node0 = supervisor_process(job, 0)
            for proc in [node0, *node0.children(recursive=True)]:
                proc.send_signal(signal.SIGSTOP)
        done = wait_until(lambda: first_step_after(run_dir, t0), 900, f"{fault}: the next step")
        out["recover_s"] = done - t0
        if fault in ("frozen", "cut"):
            lost = [f["ts"] for f in events(run_dir, "failure") if f["kind"] == "node_lost" and f["ts"] > t0]
            out["detect_s"] = min(lost) - t0
            out["replace_s"] = out["recover_s"] - out["detect_s"]
        if fault == "coordinator":
            out["detect_s"] = min(e["ts"] for e in events(run_dir, "coordinator_lost") if e["ts"] > t0) - t0
            out["replace_s"] = out["recover_s"] - out["detect_s"]
            out["elected_s"] = events(run_dir, "elected")[0]["ts"] - t0
        if fault == "rank":  # again, 3 s after the recovery's first step
            time.sleep(3.0)
            t1 = time.time()
            rank_process(job, 1).send_signal(signal.SIGKILL)
            out["rank_3s_s"] = wait_until(lambda: first_step_after(run_dir, t1), 600, "the second recovery") - t1
            started = [e for e in events(run_dir, "attempt_start") if e["ts"] > t1]
            out["warm_3s"] = all(e["warm_ranks"] == 1 for e in started)
        info = cluster.slurm("scontrol", "-o", "show", "job", job)
        out["same_job"] = "Restarts=0" in info
        load = [e for e in events(run_dir, "ckpt_load") if e["ts"] > t0]
        out["tier"] = load[0]["tier"] if load else None
        if load:  # what the restart fetched: one rank's snapshot (the spare's, from its peer's replica)
            out["load_s"] = load[0]["seconds"]
            out["snapshot_bytes"] = max(e.get("bytes", 0) for e in events(run_dir, "mem_snapshot"))
        # What refilling the spares at idle priority costs the loop: step times while the spares import
        # (the first steps of the recovered attempt) against those before the fault.
        times = [(s["ts"], s["step_time"]) for s in steps(run_dir) if "step_time" in s]
        before = [t for ts, t in times if ts < t0][-5:]
        after = [t for ts, t in times if ts > done][:5]
        if before and after:
            out["step_s_before"], out["step_s_refilling"] = statistics.median(before), statistics.median(after)
    finally:
        # SIGKILL to the batch shell and every step: a plain scancel is a SIGTERM, which the batch script
        # treats as a preemption (save, requeue), and the job would come back.
        cluster.slurm("scancel", "--full", "--signal=KILL", job)
        try:  # the next trial needs the nodes; a job still completing holds them
            wait_until(lambda: job not in cluster.slurm("squeue", "-h", "-o", "%i").split(), 600, f"job {job} gone")
        except AssertionError as err:  # wait_until's timeout
            print(f"warning: {err}", file=sys.stderr, flush=True)
        for action in ("thaw", "heal"):
            subprocess.run([str(CLUSTER_SH), action, str(cluster.state), "n1"], capture_output=True, timeout=60)
        time.sleep(2)
        cluster.resume()
    return out


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p95": p95, "min": ordered[0], "max": ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--faults", nargs="+", default=FAULTS, choices=FAULTS)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="keep each trial's run directory under this folder")
    parser.add_argument("--report", type=Path, default=None, help="only print the table of an earlier --out")
    args = parser.parse_args()
    if args.report:
        rows = json.loads(args.report.read_text())["rows"]
        report(rows, list(dict.fromkeys(r["fault"] for r in rows)))
        return
    rows: list[dict[str, Any]] = []
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(tempfile.mkdtemp(prefix="node-loss-", dir=args.keep))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="node-loss-") as tmp
    ):
        cluster = Cluster(Path(tmp) / "cluster")
        cluster.start()
        try:
            for fault in args.faults:
                for n in range(args.trials):
                    try:
                        rows.append(trial(cluster, Path(tmp), fault, n))
                    except (AssertionError, RuntimeError, OSError, subprocess.SubprocessError) as err:
                        rows.append({"fault": fault, "trial": n, "error": str(err)[:500]})  # counted, not hidden
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            cluster.stop()
    result = report(rows, args.faults)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "summary": result}, indent=1))


def report(rows: list[dict[str, Any]], faults: list[str]) -> dict[str, Any]:
    """The summary per fault (p50/p95 of each measure), printed as a table with the goals."""
    result: dict[str, Any] = {}
    for fault in faults:
        for r in rows:  # rows of an earlier version
            if r["fault"] == fault and "detect_s" in r and "replace_s" not in r:
                r["replace_s"] = r["recover_s"] - r["detect_s"]
        mine = [r for r in rows if r["fault"] == fault]
        result[fault] = {
            "n": len(mine),
            "errors": sum("error" in r for r in mine),
            "same_job": sum(bool(r.get("same_job")) for r in mine),
            "tiers": sorted({str(r.get("tier")) for r in mine}),
        }
        for key in (
            "recover_s",
            "detect_s",
            "replace_s",
            "elected_s",
            "rank_3s_s",
            "load_s",
            "step_s_before",
            "step_s_refilling",
        ):
            values = [r[key] for r in mine if key in r]
            if values:
                result[fault][key] = summary(values)
    print(
        "| fault | trials | failure -> next step p50 / p95 s | detected p50 / p95 s | detected -> next step "
        "p50 / p95 s | same job | tier |"
    )
    print("|---|---|---|---|---|---|---|")
    for fault, r in result.items():
        det, rep = r.get("detect_s"), r.get("replace_s")
        detected = f"{det['p50']:.1f} / {det['p95']:.1f}" if det else "-"
        replaced = f"{rep['p50']:.1f} / {rep['p95']:.1f}" if rep else "-"
        if "recover_s" not in r:
            print(f"| {fault} | {r['n']} | every trial failed ({r['errors']}) | - | - | - | - |")
            continue
        print(
            f"| {fault} | {r['n']} | {r['recover_s']['p50']:.1f} / {r['recover_s']['p95']:.1f} | "
            f"{detected} | {replaced} | {r['same_job']}/{r['n']} | {', '.join(r['tiers'])} |"
        )
    if "rank_3s_s" in result.get("rank", {}):
        r = result["rank"]["rank_3s_s"]
        print(f"| rank, 3 s after a recovery | {result['rank']['n']} | {r['p50']:.2f} / {r['p95']:.2f} | - | - | | |")
    for title, ok in GOALS:
        try:
            verdict = "met" if ok(result) else "MISSED"
        except KeyError:
            verdict = "not measured"
        print(f"{title}: {verdict}")
    return result


if __name__ == "__main__":
    main()
