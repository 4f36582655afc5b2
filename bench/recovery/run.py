"""Recovery benchmark: SIGKILL of a rank -> next completed step, by phase, vs a cold start; supervisor overhead.

    python bench/recovery/run.py [--config examples/tiny.yaml] [--steps 30] [--kill-at 12] [--out bench/results]

Three runs of the same config, each in a fresh run directory:
  1. cold:      `resilient run` from launch to the end; cold start = launch -> first completed step.
  2. recovery:  `resilient run`, SIGKILL of rank 1 after step --kill-at; the interval from the kill to the
                first step completed by the new attempt is split with the ledger's timestamps into
                detection (kill -> failure), teardown (failure -> restart decision: stop all ranks,
                reports), restart (decision -> ranks spawned: backoff, pre-flight, barrier), init
                (spawn -> rank_init), checkpoint load (ckpt_load seconds) and first step (the rest).
  3. bare:      the same ranks under torchrun (no supervisor, no heartbeats) for the step-time overhead.
Because step times on a shared machine are noisy, the supervisor's own CPU time while the ranks
train is also reported as a share of the ranks' CPU time (the resource it takes from training).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from resilient.core import ledger  # noqa: E402
from resilient.config import dump_config, load_config  # noqa: E402


def _train_log(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _steps(run_dir: Path, attempt: int | None = None) -> list[dict]:
    return [r for r in _train_log(run_dir) if "loss" in r and (attempt is None or r["attempt"] == attempt)]


def _resilient(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "resilient.cli", *args], cwd=REPO, stdout=out, stderr=out)


def _wait(probe, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := probe():
            return got
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def _median_step_time(run_dir: Path, skip: int) -> float:
    times = [r["step_time"] for r in _steps(run_dir)][skip:]
    return statistics.median(times)


def _cpu(proc: psutil.Process) -> tuple[float, float]:
    """(CPU seconds of the supervisor itself, CPU seconds of its ranks) so far."""
    own = proc.cpu_times()
    ranks = 0.0
    for child in proc.children():
        try:
            t = child.cpu_times()
            ranks += t.user + t.system
        except psutil.Error:
            pass
    return own.user + own.system, ranks


def cold(config: Path, sets: list[str], work: Path, steps: int) -> dict:
    """Uninterrupted supervised run; also samples CPU use of supervisor vs ranks while steps are running."""
    run_dir = work / "cold"
    launched = time.time()
    proc = _resilient(["run", str(config), "--run-dir", str(run_dir), *sets], work / "cold.log")
    ps = psutil.Process(proc.pid)
    samples = []
    while proc.poll() is None:
        done = len(_steps(run_dir))
        if 0 < done < steps:
            try:
                samples.append((time.monotonic(), *_cpu(ps)))
            except psutil.Error:
                break
        time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"cold run failed, see {work / 'cold.log'}")
    first = _steps(run_dir)[0]["ts"]
    (t0, own0, ranks0), (t1, own1, ranks1) = samples[0], samples[-1]
    return {"cold_start_s": first - launched, "run_dir": str(run_dir),
            "training_window_s": t1 - t0, "supervisor_cpu_s": own1 - own0, "ranks_cpu_s": ranks1 - ranks0}


def recovery(config: Path, sets: list[str], work: Path, kill_at: int) -> dict:
    run_dir = work / "recovery"
    proc = _resilient(["run", str(config), "--run-dir", str(run_dir), *sets], work / "recovery.log")
    committed = lambda: any(e["event"] == "ckpt_save" for e in ledger.read(run_dir))  # noqa: E731
    _wait(lambda: committed() and any(r["step"] >= kill_at for r in _steps(run_dir, 0)), 900, f"step {kill_at}")
    victim = next(c for c in psutil.Process(proc.pid).children() if c.environ().get("RANK") == "1")
    killed = time.time()
    victim.send_signal(signal.SIGKILL)
    if proc.wait() != 0:
        raise SystemExit(f"recovery run failed, see {work / 'recovery.log'}")
    ev = list(ledger.read(run_dir))

    def first(name: str, **match) -> dict:
        return next(e for e in ev if e["event"] == name and all(e.get(k) == v for k, v in match.items()))

    failure, restart = first("failure"), first("restart")
    spawned = first("attempt_start", attempt=1)
    init, load = first("rank_init", attempt=1), first("ckpt_load", attempt=1)
    step = _steps(run_dir, 1)[0]
    phases = {
        "detection": failure["ts"] - killed,
        "teardown": restart["ts"] - failure["ts"],
        "restart": spawned["ts"] - restart["ts"],
        "init": init["ts"] - spawned["ts"],
        "checkpoint_load": load["seconds"],
        "first_step": step["ts"] - init["ts"] - load["seconds"],
    }
    lost = sum(1 for r in _steps(run_dir, 0) if r["step"] > step["step"] - 1)
    return {"phases_s": phases, "kill_to_next_step_s": step["ts"] - killed, "resumed_at_step": step["step"] - 1,
            "killed_after_step": max(r["step"] for r in _steps(run_dir, 0)), "steps_recomputed": lost,
            "failure_reason": failure["reason"], "run_dir": str(run_dir)}


def bare(config: Path, sets: list[str], work: Path) -> dict:
    """The same ranks under torchrun: no supervisor, no heartbeat socket."""
    run_dir = work / "bare"
    run_dir.mkdir(mode=0o700)
    cfg = load_config(config, [*[s for s in sets if s != "--set"], f"run_dir={run_dir}"])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENT_")}
    with open(work / "bare.log", "ab") as out:
        code = subprocess.call([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={cfg.supervisor.nproc_per_node}", "-m", "trainer",
                                "--config", str(run_dir / "config.yaml")], cwd=REPO, env=env, stdout=out, stderr=out)
    if code != 0:
        raise SystemExit(f"bare run failed, see {work / 'bare.log'}")
    return {"run_dir": str(run_dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "tiny.yaml")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--kill-at", type=int, default=12)
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the step-time medians")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    sets = [a for s in (f"train.steps={args.steps}", "train.eval_every=0", f"checkpoint.interval_steps={args.ckpt_every}",
                        "metrics.port=0", "supervisor.backoff_initial_s=0.5")
            for a in ("--set", s)]
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    result = {"config": str(args.config), "steps": args.steps, "cpus": os.cpu_count()}
    result["cold"] = cold(args.config, sets, work, args.steps)
    result["recovery"] = recovery(args.config, sets, work, args.kill_at)
    result["bare"] = bare(args.config, sets, work)
    supervised = _median_step_time(Path(result["cold"]["run_dir"]), args.skip)
    unsupervised = _median_step_time(Path(result["bare"]["run_dir"]), args.skip)
    c = result["cold"]
    result["step_time_s"] = {"supervised": supervised, "bare": unsupervised,
                             "overhead_pct": 100 * (supervised - unsupervised) / unsupervised,
                             "supervisor_cpu_pct_of_ranks": 100 * c["supervisor_cpu_s"] / c["ranks_cpu_s"]}
    result["recovery_vs_cold_start"] = result["recovery"]["kill_to_next_step_s"] / result["cold"]["cold_start_s"]
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    rec = result["recovery"]
    print(f"cold start (launch -> first step): {result['cold']['cold_start_s']:.2f}s")
    print(f"SIGKILL rank 1 after step {rec['killed_after_step']} -> next step: {rec['kill_to_next_step_s']:.2f}s "
          f"(ratio to cold start {result['recovery_vs_cold_start']:.2f}); resumed at {rec['resumed_at_step']}, "
          f"{rec['steps_recomputed']} steps recomputed")
    for name, seconds in rec["phases_s"].items():
        print(f"  {name:<16} {seconds:8.3f}s")
    st = result["step_time_s"]
    print(f"median step time: supervised {st['supervised']:.4f}s, bare torchrun {st['bare']:.4f}s, "
          f"overhead {st['overhead_pct']:+.2f}%")
    print(f"supervisor CPU while training: {c['supervisor_cpu_s']:.2f}s over {c['training_window_s']:.1f}s "
          f"= {st['supervisor_cpu_pct_of_ranks']:.2f}% of the ranks' CPU ({c['ranks_cpu_s']:.1f}s)")
    print(f"written {out}")


if __name__ == "__main__":
    main()
