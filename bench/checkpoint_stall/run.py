"""bench/checkpoint_stall: how long does a checkpoint stop the training loop?

    python bench/checkpoint_stall/run.py [--repeats 3] [--run-dir DIR]

Two CPU ranks (gloo) each hold ~0.9 GB of model + Adam state. Reports per rank, as medians: the
memcpy floor (copy the state once), the disk floor (write it + fsync), a synchronous save, and the
loop-blocking time and background total of an asynchronous save. Goals: async blocking <= 1.5x the
memcpy floor and <= 5% of the synchronous save.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from resilient.supervisor.ranks import free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run-dir", type=Path, default=None)
    args = parser.parse_args()
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    env = {**os.environ, "RESILIENT_RUN_DIR": str(run_dir), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                          str(Path(__file__).with_name("rank.py")), str(run_dir), str(args.repeats)],
                         cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"benchmark failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    ranks = json.loads(lines[-1].removeprefix("RESULT "))
    print(f"{'rank':>4} {'state MB':>9} {'memcpy s':>9} {'disk s':>8} {'sync s':>8} {'async block s':>14} "
          f"{'async total s':>14} {'block/memcpy':>12} {'block/sync':>10}")
    for r in ranks:
        print(f"{r['rank']:>4} {r['state_bytes'] / 1e6:>9.0f} {r['memcpy']:>9.3f} {r['disk']:>8.3f} "
              f"{r['sync_save']:>8.3f} {r['async_blocking']:>14.3f} {r['async_total']:>14.3f} "
              f"{r['async_blocking'] / r['memcpy']:>12.2f} {r['async_blocking'] / r['sync_save']:>10.1%}")
    print(json.dumps({"ranks": ranks}))


if __name__ == "__main__":
    main()
