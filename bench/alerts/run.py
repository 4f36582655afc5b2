"""GPU alerts at a 15 s scrape, and what the node facts cost the path to the next attempt.

    python bench/alerts/run.py [--trials 10] [--baseline-tree DIR] [--kinds xid,lost]

Each trial is one `resilient run` (tiny preset, 1 rank, GPUs scripted through health.fake_nvml_dir,
health monitor every second) under a node name of its own, scraped by a real Prometheus every 15 s
(rules as shipped, evaluated every second) and a real node_exporter serving metrics.textfile_dir.
Once the rank has completed a step the GPU goes bad: XID 79 on GPU 0 (`xid`) or GPU 0 lost (`lost`).
The supervisor exits UNHEALTHY_NODE; the trial counts when ResilientGpuXidCritical /
ResilientGpuLost fires for its node and GPU within --alert-timeout of the injection.

With --baseline-tree (a checkout of the commit before the node facts, e.g.
`git archive 9543d96 | tar -x -C DIR`), every trial also runs that tree the same way (no
textfile_dir: it has none), alternating, and the path to the exit is compared: injection -> exit,
and the supervisor's own part of it, the fatal `health` ledger record (written before the node facts)
-> exit. Ratios are this tree over the baseline, medians. The write itself is also timed alone (a verdict
change: render and atomic replace of resilient_<node>.prom, 8 GPUs). JSON in bench/results/alerts-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.alerting import AlertWatch, LiveRun, gpus  # noqa: E402

BAD = {
    "xid": (gpus({"index": 0, "xids": [79]}, {"index": 1}), "ResilientGpuXidCritical"),
    "lost": (gpus({"index": 0, "lost": True}, {"index": 1}), "ResilientGpuLost"),
}
SETS = ["health.monitor_interval_s=1", "supervisor.warm_spares=false", "checkpoint.interval_steps=1000"]


def trial(work: Path, node: str, kind: str, textfile_dir: Path | None, repo: Path, watch: AlertWatch) -> dict:
    run = LiveRun(work / node, node, textfile_dir, SETS, repo=repo).start()
    try:
        if textfile_dir is not None:
            watch.add_supervisor(node, run.metrics_port())
        run.running_rank(timeout=300)
        injected = time.time()
        run.set_gpus(BAD[kind][0])
        code = run.exit_code(120)
        exited = time.time()
    finally:
        run.stop()
    fatal = [e for e in run.events("health") if e.get("severity") == "fatal"]
    return {
        "node": node,
        "kind": kind,
        "tree": "baseline" if textfile_dir is None else "this",
        "exit_code": code,
        "injected": injected,
        "inject_to_exit_s": exited - injected,
        "verdict_to_exit_s": exited - fatal[0]["ts"] if fatal else None,
    }


def facts_write_cost(directory: Path, writes: int = 400) -> dict:
    """What the node facts add where they are written: one verdict change (render + atomic replace), median."""
    from health.actions import decide_health
    from health.types import HealthReport, fatal, ok
    from resilient.core.exit_codes import ExitCode
    from resilient.metrics.textfile import NodeFacts

    facts = NodeFacts(directory, "bench-write")
    reports = [
        HealthReport("bench-write", [ok("gpu.xid", "no XID")]),
        HealthReport("bench-write", [fatal("gpu.xid", "critical XID 79 on gpu0")]),
    ]
    gpu = {str(i): {"last_xid": 0.0, "ecc_uncorrectable": 0.0, "lost": 0.0, "remap_failed": 0.0} for i in range(8)}
    times = []
    for i in range(writes):  # alternating verdicts: every call rewrites the file
        report = reports[i % 2]
        t0 = time.perf_counter()
        facts.on_health(decide_health(report, "training"), gpu, report.ts)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    facts.on_exit(ExitCode.UNHEALTHY_NODE, "unhealthy (training) node bench-write: gpu.xid: critical XID 79 on gpu0")
    return {
        "verdict_write_s_median": statistics.median(times),
        "verdict_write_s_max": max(times),
        "exit_write_s": time.perf_counter() - t0,
        "writes": writes,
        "gpus": len(gpu),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--kinds", default="xid,lost")
    ap.add_argument("--baseline-tree", type=Path, default=None)
    ap.add_argument("--alert-timeout", type=float, default=120.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-alerts-"))
    watch = AlertWatch(work / "watch").start()
    rows: list[dict] = []
    try:
        for i in range(args.trials):
            for kind in args.kinds.split(","):
                trees = [("this", REPO, watch.textfile_dir)]
                if args.baseline_tree is not None:
                    trees.append(("baseline", args.baseline_tree.resolve(), None))
                for name, repo, textfile_dir in trees if i % 2 == 0 else trees[::-1]:
                    row = trial(work, f"bench-{kind}-{name}-{i}", kind, textfile_dir, repo, watch)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        for row in rows:  # each trial's alert, waited for once every trial has run
            if row["tree"] != "this":
                continue
            alert = BAD[row["kind"]][1]
            left = row["injected"] + args.alert_timeout - time.time()
            try:
                watch.wait_firing(alert, max(left, 0.0), node=row["node"], gpu="0")
            except AssertionError:
                pass
            first = watch.first_seen(alert, node=row["node"], gpu="0")
            row["fired"] = first is not None and first - row["injected"] <= args.alert_timeout
            row["inject_to_firing_s"] = None if first is None else first - row["injected"]
    finally:
        watch.stop()

    def med(tree: str, kind: str, key: str) -> float | None:
        values = [r[key] for r in rows if r["tree"] == tree and r["kind"] == kind and r[key] is not None]
        return statistics.median(values) if values else None

    summary: dict = {}
    for kind in args.kinds.split(","):
        mine = [r for r in rows if r["tree"] == "this" and r["kind"] == kind]
        s = {
            "alert": BAD[kind][1],
            "fired": f"{sum(r['fired'] for r in mine)}/{len(mine)}",
            "exit_codes": sorted({r["exit_code"] for r in rows if r["kind"] == kind}),
            "inject_to_firing_s_median": med("this", kind, "inject_to_firing_s"),
            "inject_to_firing_s_max": max((r["inject_to_firing_s"] or 0) for r in mine) if mine else None,
        }
        for key in ("inject_to_exit_s", "verdict_to_exit_s"):
            s[f"{key}_median_this"] = med("this", kind, key)
            if args.baseline_tree is not None:
                base = med("baseline", kind, key)
                s[f"{key}_median_baseline"] = base
                s[f"{key}_ratio_this_over_baseline"] = (s[f"{key}_median_this"] / base) if base else None
        summary[kind] = s
    summary["facts_write"] = facts_write_cost(work)
    summary["load_average_at_end"] = os.getloadavg()
    out = REPO / "bench" / "results" / f"alerts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "trials": rows}, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"results: {out}")
    return 0 if all(r["fired"] for r in rows if r["tree"] == "this") else 1


if __name__ == "__main__":
    sys.exit(main())
