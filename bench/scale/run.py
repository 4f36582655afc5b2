"""Scale benchmark of the supervisors' coordination: 2..1024 simulated slots x 8 fake ranks, one run.

    python bench/scale/run.py [--nodes 2 8 32 128 512 1024] [--steady-s 4] [--out bench/results/scale.json]

For every slot count N (bench/scale/simulate.py: the real Coordinator, typed reports, leases, the roster,
`decide_attempt`, the election and status code on one thread per slot, slot 0 hosting the first
authenticated store on 127.0.0.1; the last 2 slots are spare nodes):
  ops/s        store round trips per second of all slots together at steady state (leases included)
  fail->stop   a rank failure on the last node -> every node's ranks stopped
  decide->go   the coordinator's restart decision -> every node past the next attempt's barrier
  silent node  the last node goes silent (no lease, no call) -> every node stopped (its lease expired:
               node_lease_s plus detection), and -> every node past the barrier with a spare in its place
  silent coordinator  slot 0 frozen (SIGSTOP) -> slot 1 elected, and -> every survivor past the barrier
  preempt      a preemption signal on slot N/2 -> every node's ranks stopped
  status KB    size of status.json (8N ranks); status s: wall (and CPU) time of `resilient status --json`
  node0 CPU    node 0's coordination thread + the store server's threads, as a share of one core
Then a power-law fit y ~ N^b of each column, and each row against the goals (GOALS; docs/scale.md):
failure, decision and preemption each reach every node within 2 s, a lease expiry stops every node
within 5 s of it, an election restarts every survivor within 3 leases, the store stays within its ops
budget at ~2-10 round trips per node and second, `resilient status --json` costs <= 0.5 s of CPU.
All nodes share the machine's cores, so latencies here are upper bounds for one node per machine;
these are measurements, not test assertions (tests/supervisor/test_scale_sim.py checks behaviour only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.scale.simulate import scenario  # noqa: E402

COLUMNS = [
    ("ops_per_s", "store ops/s", "{:.0f}"),
    ("fail_to_stop_s", "fail->all stopped s", "{:.2f}"),
    ("decide_to_go_s", "decision->all past barrier s", "{:.2f}"),
    ("lease_to_stop_s", "silent node->all stopped s", "{:.2f}"),
    ("lease_to_go_s", "silent node->spare past barrier s", "{:.2f}"),
    ("election_s", "silent coordinator->elected s", "{:.2f}"),
    ("election_to_go_s", "silent coordinator->all past barrier s", "{:.2f}"),
    ("preempt_to_stop_s", "preempt->all stopped s", "{:.2f}"),
    ("status_kb", "status.json KB", "{:.0f}"),
    ("status_cmd_s", "`status --json` s", "{:.2f}"),
    ("status_cmd_cpu_s", "`status` CPU s", "{:.2f}"),
    ("node0_cpu", "node 0 CPU share", "{:.1%}"),
    ("poll_s", "poll interval s", "{:.3g}"),
]


def status_command(run_dir: Path) -> tuple[float, float]:
    """Wall and CPU seconds of `resilient status RUN_DIR --json` as an operator runs it."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "resilient.cli", "status", str(run_dir), "--json"],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


GOALS = [
    ("fail_to_stop_s", "failure -> all stopped <= 2 s", lambda r: r["fail_to_stop_s"] <= 2.0),
    ("lease_to_stop_s", "lease expiry -> all stopped <= 5 s", lambda r: r["lease_to_stop_s"] - r["lease_s"] <= 5.0),
    (
        "election_to_go_s",
        "coordinator lost -> every survivor restarted, within 3 leases",
        lambda r: r["election_to_go_s"] <= 3 * r["lease_s"],
    ),
    ("decide_to_go_s", "decision -> all past the barrier <= 2 s", lambda r: r["decide_to_go_s"] <= 2.0),
    ("preempt_to_stop_s", "preemption -> all stopped <= 2 s", lambda r: r["preempt_to_stop_s"] <= 2.0),
    (
        "ops_per_s",
        "store ops/s within 2..10 per node and the 8000 budget",
        lambda r: 2 * r["nodes"] < r["ops_per_s"] < min(10 * r["nodes"], 8000),
    ),
    ("status_cmd_cpu_s", "`status --json` CPU <= 0.5 s", lambda r: not r["status_cmd_cpu_s"] > 0.5),
]


def goal_lines(rows: list[dict]) -> list[str]:
    """One line per node count: each goal met or missed, with the measured value."""
    lines = []
    for r in rows:
        verdicts = [f"{title}: {'met' if ok(r) else 'MISSED'} ({r[key]:.3g})" for key, title, ok in GOALS]
        lines.append(f"{r['nodes']} nodes: " + "; ".join(verdicts))
    return lines


def power_fit(ns: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares fit of log y = log a + b log N: (a, b)."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys, strict=True) if y > 0]
    if len(pts) < 2:
        return float("nan"), float("nan")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return math.exp(my - b * mx), b


def table(rows: list[dict[str, float]]) -> str:
    head = "| nodes | ranks | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (2 + len(COLUMNS))]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['ranks']} | " + " | ".join(fmt.format(r[k]) for k, _, fmt in COLUMNS) + " |")
    ns = [r["nodes"] for r in rows]
    fits = [power_fit(ns, [r[k] for r in rows]) for k, _, _ in COLUMNS]
    lines.append("| fit y ~ N^b | | " + " | ".join(f"b={b:.2f}" for _, b in fits) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    parser.add_argument("--steady-s", type=float, default=4.0)
    parser.add_argument(
        "--lease-s",
        type=float,
        default=None,
        help="supervisor.node_lease_s (default the config's): every simulated node shares this machine's cores",
    )
    parser.add_argument("--out", type=Path, default=None, help="Write the rows and fits as JSON here.")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for n in args.nodes:
            run_dir = Path(tmp) / f"n{n}"
            run_dir.mkdir(mode=0o700)
            cfg = {"node_lease_s": args.lease_s} if args.lease_s else None
            rows.append(scenario(n, run_dir, args.steady_s, status_probe=status_command, spares=2, cfg=cfg))
            print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    print("\n".join(goal_lines(rows)))
    if args.out:
        ns = [r["nodes"] for r in rows]
        fits = {k: dict(zip(("a", "b"), power_fit(ns, [r[k] for r in rows]), strict=True)) for k, _, _ in COLUMNS}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "fits": fits}, indent=1))


if __name__ == "__main__":
    main()
