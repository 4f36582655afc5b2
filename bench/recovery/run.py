"""Recovery benchmark: SIGKILL of rank 1 -> next completed step, resilient next to ft_launcher and torchrun.

    python bench/recovery/run.py [--trials 10] [--config examples/tiny.yaml] [--kill-at 25] [--ckpt-every 10]

The same trainer (`python -m trainer`, tiny preset, 2 ranks, gloo) under three launchers, alternating
per trial, each trial in a fresh run directory:
  - resilient:   `resilient run` (warm standby ranks, supervisor defaults);
  - ft_launcher: nvidia-resiliency-ext 0.4.1 `ft_launcher --max-restarts=2 --monitor-interval=0.1`;
  - torchrun:    `torchrun --max-restarts=2`.
Every trial is also a cold start (launch -> first completed step). Once a checkpoint is committed and
step --kill-at is done, rank 1 gets SIGKILL; recovery = kill -> the first step completed after it (the
trainer's train_log.jsonl timestamps). For resilient the ledger splits it into detection (kill ->
failure), teardown (failure -> restart decision), restart (decision -> ranks handed over), init
(-> rank_init), checkpoint load and first step. Reports p50/p95 per launcher, resilient p50 / cold
start (goal <= 0.3) and resilient p50 / each peer's p50. A launcher whose ranks do not step again
within --timeout counts the trial as failed (torchrun's restarted ranks can hang in megatron's
process-group creation). Results JSON in bench/results/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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

from resilient.config import dump_config, load_config  # noqa: E402 (after the sys.path insert above)
from resilient.core import ledger  # noqa: E402
from resilient.supervisor.progress import newest_complete_step  # noqa: E402
from resilient.supervisor.spares import is_parked  # noqa: E402

LAUNCHERS = ("resilient", "ft_launcher", "torchrun")


def _train_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if "loss" in rec:
            out.append(rec)
    return out


def _wait(probe, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := probe():
            return got
        time.sleep(0.02)
    return None


def _status_rank1(run_dir: Path) -> psutil.Process | None:
    """resilient: rank 1 as its supervisor publishes it (status.json), never a parked spare."""
    try:
        ranks = json.loads((run_dir / "status.json").read_text())["ranks"]
        [pid] = [r["pid"] for r in ranks if r["rank"] == 1 and r.get("exit_code") is None]
        return psutil.Process(pid)
    except (OSError, ValueError, KeyError, psutil.Error):
        return None


def _rank1(launcher: psutil.Process) -> psutil.Process | None:
    """The rank-1 process below the launcher: RANK=1 in its environment, not a parked spare, and not a
    child of another RANK=1 process (data-loader workers inherit the environment)."""
    try:
        procs = launcher.children(recursive=True)
    except psutil.Error:
        return None
    ones = []
    for p in procs:
        try:
            if p.environ().get("RANK") == "1" and not is_parked(p.pid) and p.status() != psutil.STATUS_ZOMBIE:
                ones.append(p)
        except psutil.Error:
            continue
    pids = {p.pid for p in ones}
    tops = [p for p in ones if p.ppid() not in pids]
    return tops[0] if len(tops) == 1 else None


def _command(launcher: str, config: Path, run_dir: Path, nproc: int) -> list[str]:
    rank = ["-m", "trainer", "--config", str(run_dir / "config.yaml")]
    if launcher == "resilient":
        return [sys.executable, "-m", "resilient.cli", "run", str(config), "--run-dir", str(run_dir)]
    if launcher == "ft_launcher":
        exe = shutil.which("ft_launcher")
        if exe is None:
            raise SystemExit("ft_launcher not found: pip install nvidia-resiliency-ext==0.4.1")
        return [exe, "--standalone", f"--nproc-per-node={nproc}", "--max-restarts=2", "--monitor-interval=0.1", *rank]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "--max-restarts=2",
        *rank,
    ]


def _end(proc: subprocess.Popen, run_dir: Path) -> None:
    """Kill the launcher's session and wait until no process of the run is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    target = str(run_dir)

    def leftovers() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            try:
                env = p.environ()
                if (
                    env.get("RESILIENT_RUN_DIR") == target or env.get("BENCH_RECOVERY_RUN") == target
                ) and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.Error:
                continue
        return out

    for p in leftovers():
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait(lambda: not leftovers(), 10)


def trial(launcher: str, config: Path, sets: list[str], work: Path, number: int, kill_at: int, timeout: float) -> dict:
    run_dir = work / f"{launcher}-{number}"
    run_dir.mkdir(mode=0o700)
    cfg = load_config(config, [*sets, f"run_dir={run_dir}"])
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESILIENT_")}
    env["BENCH_RECOVERY_RUN"] = str(run_dir)  # marks every process of the trial (leftover check)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    argv = _command(launcher, run_dir / "config.yaml", run_dir, cfg.supervisor.nproc_per_node)
    with open(work / f"{launcher}-{number}.log", "ab") as log:
        launched = time.time()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
    out: dict = {"launcher": launcher, "trial": number, "run_dir": str(run_dir), "launched": launched}
    try:
        first = _wait(lambda: _train_steps(run_dir)[:1], timeout)
        if not first:
            return {**out, "error": f"no first step within {timeout:g}s"}
        out["cold_start_s"] = first[0]["ts"] - launched
        root = cfg.checkpoint.root(run_dir)
        ready = _wait(
            lambda: (newest_complete_step(root) or 0) > 0 and max(r["step"] for r in _train_steps(run_dir)) >= kill_at,
            timeout,
        )
        if not ready:
            return {**out, "error": f"no committed checkpoint and step {kill_at} within {timeout:g}s"}
        if launcher == "resilient":  # a failure hours in finds the spares refilled: wait until they are warm
            nproc = cfg.supervisor.nproc_per_node
            out["spares_wait_s"] = -time.time()
            _wait(lambda: _warm_lines(run_dir) >= 2 * nproc, min(timeout, 90))
            out["spares_wait_s"] += time.time()
        victim = _wait(
            lambda: _status_rank1(run_dir) if launcher == "resilient" else _rank1(psutil.Process(proc.pid)), 10
        )
        if victim is None:
            return {**out, "error": "rank 1 not found"}
        killed_after = max(r["step"] for r in _train_steps(run_dir))
        if launcher == "resilient":  # the spares of attempt 0's ranks took them; did the next ones finish importing?
            out["spares_warm_at_kill"] = max(0, _warm_lines(run_dir) - cfg.supervisor.nproc_per_node)
            try:
                out["spares_status"] = json.loads((run_dir / "status.json").read_text()).get("spares")
            except (OSError, json.JSONDecodeError):
                pass
        killed = time.time()
        victim.send_signal(signal.SIGKILL)
        attempt = max(r["attempt"] for r in _train_steps(run_dir))

        def resumed(r: dict) -> bool:
            # The new attempt's first step: a step the old rank 0 finished just after the kill is not one.
            # resilient numbers its attempts; under the peers (attempt 0 always) it is a step done again.
            return r["attempt"] > attempt if launcher == "resilient" else r["step"] <= killed_after

        nxt = _wait(lambda: [r for r in _train_steps(run_dir) if r["ts"] > killed and resumed(r)][:1], timeout)
        if not nxt:
            return {**out, "error": f"no step within {timeout:g}s of the kill", "killed_after_step": killed_after}
        out.update(recovery_s=nxt[0]["ts"] - killed, killed_after_step=killed_after, resumed_step=nxt[0]["step"])
        if launcher == "resilient":
            out["phases_s"] = _phases(run_dir, killed, nxt[0])
        return out
    finally:
        _end(proc, run_dir)


def _warm_lines(run_dir: Path) -> int:
    """Spares of this run that finished their imports (resilient.rank.park says so in the spares log)."""
    logs = list((run_dir / "logs").glob("spares.node*.log"))
    return sum(
        line.startswith("resilient park: pid") and " warm after " in line
        for log in logs
        for line in log.read_text(errors="replace").splitlines()
    )


def _phases(run_dir: Path, killed: float, step: dict) -> dict:
    ev = list(ledger.read(run_dir))

    def first(name: str, **match) -> dict | None:
        return next((e for e in ev if e["event"] == name and all(e.get(k) == v for k, v in match.items())), None)

    failure, restart = first("failure"), first("restart")
    attempt = step.get("attempt", 1)
    spawned, init = first("attempt_start", attempt=attempt), first("rank_init", attempt=attempt)
    load = first("ckpt_load", attempt=attempt)
    if not (failure and restart and spawned and init):
        return {}
    load_s = load["seconds"] if load else 0.0
    return {
        "detection": failure["ts"] - killed,
        "teardown": restart["ts"] - failure["ts"],
        "restart": spawned["ts"] - restart["ts"],
        "init": init["ts"] - spawned["ts"],
        "checkpoint_load": load_s,
        "first_step": step["ts"] - init["ts"] - load_s,
        "warm_ranks": spawned.get("warm_ranks"),
    }


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summarize(trials: list[dict]) -> dict:
    out: dict = {}
    for name in LAUNCHERS:
        mine = [t for t in trials if t["launcher"] == name]
        rec = [t["recovery_s"] for t in mine if "recovery_s" in t]
        cold = [t["cold_start_s"] for t in mine if "cold_start_s" in t]
        out[name] = {
            "trials": len(mine),
            "failed": [t.get("error") for t in mine if "recovery_s" not in t],
            "recovery_p50_s": statistics.median(rec) if rec else None,
            "recovery_p95_s": _pct(rec, 0.95),
            "cold_start_p50_s": statistics.median(cold) if cold else None,
        }
    res = out["resilient"]
    if res["recovery_p50_s"] is not None:
        ratios = {"resilient_p50_over_cold_start": res["recovery_p50_s"] / res["cold_start_p50_s"]}
        for peer in LAUNCHERS[1:]:
            if out[peer]["recovery_p50_s"]:
                ratios[f"resilient_p50_over_{peer}_p50"] = res["recovery_p50_s"] / out[peer]["recovery_p50_s"]
        out["ratios"] = ratios
        phases = [t["phases_s"] for t in trials if t.get("phases_s")]
        if phases:
            out["resilient"]["phases_p50_s"] = {
                k: statistics.median(p[k] for p in phases) for k in phases[0] if k != "warm_ranks"
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "examples" / "tiny.yaml")
    ap.add_argument("--trials", type=int, default=10, help="trials per launcher (>= 10 for the p95)")
    ap.add_argument("--steps", type=int, default=100000, help="train.steps (the run is ended after the recovery)")
    ap.add_argument("--kill-at", type=int, default=25)
    ap.add_argument("--ckpt-every", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=300.0, help="per phase of a trial before it counts as failed")
    ap.add_argument("--launchers", default=",".join(LAUNCHERS))
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped benchmark still ends its trial's run
    launchers = [name for name in args.launchers.split(",") if name]
    unknown = set(launchers) - set(LAUNCHERS)
    if unknown:
        raise SystemExit(f"--launchers: unknown {sorted(unknown)} (known: {', '.join(LAUNCHERS)})")
    sets = [
        f"train.steps={args.steps}",
        "train.eval_every=0",
        f"checkpoint.interval_steps={args.ckpt_every}",
        "metrics.port=0",
    ]
    work = Path(tempfile.mkdtemp(prefix="bench-recovery-"))
    trials = []
    for number in range(args.trials):
        order = launchers if number % 2 == 0 else launchers[::-1]  # alternate, so drift hits all alike
        for name in order:
            t = trial(name, args.config, sets, work, number, args.kill_at, args.timeout)
            trials.append(t)
            print(
                json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in t.items() if k != "phases_s"}),
                flush=True,
            )
    result = {
        "config": str(args.config),
        "kill_at": args.kill_at,
        "ckpt_every": args.ckpt_every,
        "cpus": os.cpu_count(),
        "work": str(work),
        "trials": trials,
        "summary": summarize(trials),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    s = result["summary"]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}s"

    for name in launchers:
        r = s[name]
        print(
            f"{name:<12} cold start p50 {fmt(r['cold_start_p50_s'])}  SIGKILL -> next step p50 "
            f"{fmt(r['recovery_p50_s'])} p95 {fmt(r['recovery_p95_s'])}  ({r['trials']} trials, "
            f"{len(r['failed'])} failed)"
        )
    if "phases_p50_s" in s.get("resilient", {}):
        phases = s["resilient"]["phases_p50_s"]
        print("resilient phases (p50): " + ", ".join(f"{k} {v:.3f}s" for k, v in phases.items()))
    for k, v in s.get("ratios", {}).items():
        print(f"{k}: {v:.2f}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
