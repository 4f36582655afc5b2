"""bench/checkpoint_stall: what does a checkpoint cost the training loop, in all?

    python bench/checkpoint_stall/run.py [--repeats 2] [--interval 10] [--modes none,async,sync] [--ranks 2] \
        [--run-dir DIR]

Two CPU ranks (gloo) each hold ~0.9 GB of model + optimizer state (stall.yaml). In one run the modes
take turns, a block of `--interval` steps each (see rank.py): per mode, the extra wall time a save
costs the loop (its block's wall time minus the no-save steps' median), against the memcpy floor.
Goal: async <= 0.25 x sync. The machine's load (load average, busy CPU share) is reported with the
numbers; results JSON goes to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from resilient.rank.env import RankEnv  # noqa: E402
from resilient.supervisor.ranks import free_port  # noqa: E402


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def launch(run_dir: Path, args: argparse.Namespace) -> list[dict]:
    port, world = free_port(), args.ranks
    rank_py = Path(__file__).with_name("rank.py")
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            **RankEnv(
                rank=rank, local_rank=rank, world_size=world, local_world_size=world, master_port=port
            ).to_environ(),
            "RESILIENT_RUN_DIR": str(run_dir),
            "PYTHONWARNINGS": "ignore",
            "OMP_NUM_THREADS": "1",
        }
        log = open(run_dir / f"rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, str(rank_py), str(run_dir), str(args.interval), str(args.repeats), args.modes],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE if rank == 0 else log,
                stderr=log,
                text=True,
            )
        )
    out = procs[0].communicate()[0]
    codes = [procs[0].returncode] + [p.wait() for p in procs[1:]]
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if any(codes) or not lines:
        sys.exit(f"benchmark failed (exits {codes}):\n{(run_dir / 'rank0.log').read_text()[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarize(ranks: list[dict]) -> dict:
    """Per mode: the median over blocks of the extra wall time, slowest rank's view (rank 0 decides)."""
    r0 = ranks[0]
    base = statistics.median(s for b in r0["blocks"]["none"] for s in b["steps"])
    out = {
        "baseline_step_s": base,
        "state_gb": r0["state_bytes"] / 1e9,
        "memcpy_fresh_s": r0["memcpy_fresh"],
        "memcpy_reused_s": r0["memcpy_reused"],
        "modes": {},
    }
    for mode, blocks in r0["blocks"].items():
        n = len(blocks[0]["steps"])
        extra = [b["wall"] - n * base for b in blocks]
        out["modes"][mode] = {
            "extra_s": statistics.median(extra),
            "extra_each": [round(e, 3) for e in extra],
            "blocking_s": statistics.median(b["blocking"] for b in blocks),
            "first_step_s": statistics.median(b["steps"][0] for b in blocks),
            "finish_wait_s": statistics.median(b["finish_wait"] for b in blocks),
            "minor_faults": statistics.median(b["minor_faults"] for b in blocks),
            "loop_cpu_s": statistics.median(b["loop_cpu"] for b in blocks),
            "cpu_s": statistics.median(b["cpu"] + b["children_cpu"] for b in blocks),
        }
        if f"first_{mode}" in r0:  # the run's first save of this mode (buffers allocated, plans made)
            out["modes"][mode]["first_save_extra_s"] = r0[f"first_{mode}"]["wall"] - base
    modes, none = out["modes"], out["modes"]["none"]
    for m in modes.values():  # against the no-save blocks: CPU the save put on the loop thread / the machine
        m["extra_loop_cpu_s"] = m["loop_cpu_s"] - none["loop_cpu_s"]
        m["extra_cpu_s"] = m["cpu_s"] - none["cpu_s"]
    if "async" in modes and "sync" in modes:
        out["async_over_sync"] = modes["async"]["extra_s"] / modes["sync"]["extra_s"]
        out["async_over_sync_loop_cpu"] = modes["async"]["extra_loop_cpu_s"] / modes["sync"]["extra_loop_cpu_s"]
    if "memory" in modes:  # goal: the memory tier costs the loop <= 1.5 x one copy of the state
        out["memory_over_memcpy"] = modes["memory"]["extra_s"] / out["memcpy_reused_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--modes", default="none,async,sync,memory")
    parser.add_argument("--run-dir", type=Path, default=None)
    parser.add_argument(
        "--ranks",
        type=int,
        default=2,
        help="ranks on this machine: 2 keep both cores of a 2-core machine busy (nothing idle for "
        "a background writer); 1 leaves a core idle, as a GPU node's host cores are while the "
        "GPU trains",
    )
    args = parser.parse_args()
    if "none" not in args.modes.split(","):
        sys.exit("--modes must include none (the baseline)")
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    load0, busy0, started = os.getloadavg()[0], cpu_busy(), time.time()
    ranks = launch(run_dir, args)
    busy1 = cpu_busy()
    summary = summarize(ranks)
    summary["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg()[0],
        "busy_share": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        "wall_s": time.time() - started,
    }
    print(
        f"baseline step {summary['baseline_step_s']:.3f} s; state {summary['state_gb']:.2f} GB/rank; memcpy floor "
        f"{summary['memcpy_reused_s']:.3f} s (reused buffer), {summary['memcpy_fresh_s']:.3f} s (fresh)"
    )
    print(
        f"{'mode':>6} {'extra wall s':>12} {'loop cpu s':>10} {'all cpu s':>9} {'blocking s':>10} "
        f"{'1st step s':>10} {'finish s':>8} {'faults':>8} {'first save':>10}  extra wall each"
    )
    for mode, m in summary["modes"].items():
        print(
            f"{mode:>6} {m['extra_s']:>12.3f} {m['extra_loop_cpu_s']:>10.3f} {m['extra_cpu_s']:>9.2f} "
            f"{m['blocking_s']:>10.3f} {m['first_step_s']:>10.3f} {m['finish_wait_s']:>8.3f} "
            f"{m['minor_faults']:>8.0f} {m.get('first_save_extra_s', 0):>10.3f}  {m['extra_each']}"
        )
    if "async_over_sync" in summary:
        print(
            f"async / sync: extra wall time {summary['async_over_sync']:.2f} (goal <= 0.25), "
            f"extra loop-thread CPU {summary['async_over_sync_loop_cpu']:.2f}"
        )
    if "memory_over_memcpy" in summary:
        print(f"memory / memcpy floor: extra wall time {summary['memory_over_memcpy']:.2f} (goal <= 1.5)")
    mach = summary["machine"]
    print(
        f"machine: {mach['cpus']} CPUs, load average {mach['loadavg_before']:.2f} -> {mach['loadavg_after']:.2f}, "
        f"busy {mach['busy_share']:.0%} during the run"
    )
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    (results / f"checkpoint_stall-{int(started)}.json").write_text(json.dumps({"summary": summary, "ranks": ranks}))


if __name__ == "__main__":
    main()
