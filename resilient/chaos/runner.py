"""Run a supervised training run under a fault schedule, relaunching it like Slurm would, and report.

The drill launches `resilient run CONFIG`, follows the ledger and the train log as they grow, fires each
trigger once its fault is `ready`, waits for the run's reaction (a ledger record) before the next, and
relaunches the supervisor after PREEMPTED, after its own death, and after UNHEALTHY_NODE (with the
scripted GPU fault cleared: a requeue lands on a repaired node). Every injection is also recorded in the
ledger as `chaos_fault`.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from resilient.chaos import checks
from resilient.chaos.faults import FAULTS, Fault, Injection
from resilient.chaos.schedule import Trigger, due
from resilient.config import RunConfig, load_config
from resilient.core import ledger
from resilient.core.errors import ConfigError
from resilient.core.events import LedgerEvent
from resilient.core.exit_codes import ExitCode
from resilient.core.rundir import RunDir
from resilient.status import read_status, run_goodput
from trainer.checkpoint import ondisk
from trainer.injection import TARGETS

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.02
# A marker-less step directory is a save in flight only while it is being written to.
IN_FLIGHT_S = 3.0
# STORAGE_FAULT: the fill_disk fault frees the space once seen, as an operator would before resubmitting.
RELAUNCH = {ExitCode.PREEMPTED, ExitCode.UNHEALTHY_NODE, ExitCode.STORAGE_FAULT, -signal.SIGKILL}


@dataclass
class DrillOptions:
    config: Path
    run_dir: Path
    overrides: list[str] = field(default_factory=list)
    timeout_s: float = 900.0
    """Give up (and stop the run) after this long."""
    detect_timeout_s: float = 120.0
    """An injected fault not seen in the ledger within this long counts as undetected."""
    fill_size_mb: int = 64
    """Size of the tmpfs mounted as the checkpoint directory when fill_disk is scheduled."""
    max_launches: int = 50
    orphan_wait_s: float = 15.0
    bitflip_target: str = "weights"
    """What `bitflip` flips: weights, gradients or activation."""
    bitflip_bit: int | None = None
    """Which bit `bitflip` flips (None: the trainer's default for the target)."""


class Drill:
    """The run under test, as the faults see it."""

    def __init__(self, opts: DrillOptions, faults: list[str], seed: int) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ConfigError(f"chaos: unknown fault {unknown[0]!r} (choose from {', '.join(FAULTS)})")
        if opts.bitflip_target not in TARGETS:
            raise ConfigError(f"chaos: --bitflip-target {opts.bitflip_target!r} is not one of {', '.join(TARGETS)}")
        self.opts = opts
        self.run_dir = opts.run_dir.expanduser().resolve()
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.node_name = os.environ.get("RESILIENT_NODE_NAME", "chaos-node0")
        extra: list[str] = []
        self.fill_mount: Path | None = None
        if "fill_disk" in faults:
            self.fill_mount = self.run_dir / "ckpt-tmpfs"
            # The tmpfs is small on purpose: only a failing write, not its size, is a storage fault here.
            extra += [f"checkpoint.dir={self.fill_mount}", "health.ckpt_min_free_gib=0"]
        self.fake_nvml_file: Path | None = None
        if "gpu_health" in faults:
            nvml_dir = self.run_dir / "fake-nvml"
            nvml_dir.mkdir(mode=0o700, exist_ok=True)
            self.fake_nvml_file = nvml_dir / f"{self.node_name}.json"
            extra.append(f"health.fake_nvml_dir={nvml_dir}")
        self.overrides = [*opts.overrides, *extra]
        self.cfg: RunConfig = load_config(opts.config, [*self.overrides, f"run_dir={self.run_dir}"])
        self.ckpt_root = self.cfg.checkpoint.root(self.run_dir)
        self.supervisor: psutil.Popen | None = None
        self.launched_at = 0.0
        self.exit_codes: list[int] = []
        self.timed_out: dict[str, Any] | None = None
        """Where the run stood when the drill's timeout passed (None: it did not)."""
        self.ledger_records: list[dict[str, Any]] = []
        self.train_records: list[dict[str, Any]] = []
        self._offsets = {"ledger": 0, "train": 0}
        self.step = 0
        self.first_step_ts: float | None = None
        self.rng = random.Random(seed)

    # -- what faults ask ---------------------------------------------------------------------------------

    def _status(self) -> dict[str, Any] | None:
        try:
            status = read_status(self.run_dir)
        except ConfigError:
            return None
        return status if status.get("written_at", 0) >= self.launched_at else None

    def where_it_stands(self) -> dict[str, Any]:
        """The evidence a timed-out drill reports: the status phases and the supervisor's last log lines."""
        status = self._status() or {}
        try:
            tail = (self.run_dir / "chaos-supervisor.log").read_text(errors="replace").splitlines()[-8:]
        except OSError:
            tail = []
        return {
            "step": self.step,
            "state": status.get("state"),
            "phases": [(r.get("rank"), r.get("phase")) for r in status.get("ranks", [])],
            "events": [r.get("event") for r in self.ledger_records[-6:]],
            "log": tail,
        }

    def attempt(self) -> int | None:
        status = self._status()
        return None if status is None else status.get("attempt")

    def next_attempt(self) -> int:
        """The attempt the next launch starts with (attempt numbers continue across launches)."""
        seen = [e["attempt"] for e in ledger.read(self.run_dir) if e.get("event") == LedgerEvent.ATTEMPT_START]
        return max(seen) + 1 if seen else 0

    def _ranks(self) -> dict[int, psutil.Process]:
        """Live ranks of the current supervisor, per status.json, checked against the process table."""
        status, out = self._status(), {}
        if status is None or self.supervisor is None:
            return {}
        for r in status.get("ranks", []):
            try:
                proc = psutil.Process(r["pid"])
                if proc.ppid() == self.supervisor.pid and proc.environ().get("RANK") == str(r["rank"]):
                    out[r["rank"]] = proc
            except (psutil.Error, KeyError, TypeError):
                return {}
        return out

    def training(self) -> bool:
        """Ranks of the current supervisor are all in their step loop."""
        status = self._status()
        if status is None or status.get("state") != "running":
            return False
        ranks = status.get("ranks", [])
        live = self._ranks()
        return bool(ranks) and len(live) == len(ranks) and all(r.get("phase") == "step" for r in ranks)

    def pick_rank(self) -> tuple[int, psutil.Process]:
        """A rank chosen by the drill's seeded generator."""
        ranks = self._ranks()
        rank = sorted(ranks)[self.rng.randrange(len(ranks))]
        return rank, ranks[rank]

    def save_in_flight(self) -> int | None:
        """Step of a checkpoint being written now (its directory exists, has no marker, and is fresh)."""
        committed = ondisk.committed_steps(self.ckpt_root)
        newest = committed[-1] if committed else 0
        now = time.time()
        for step, path in ondisk.step_dirs(self.ckpt_root).items():
            try:
                fresh = now - path.stat().st_mtime < IN_FLIGHT_S
            except FileNotFoundError:
                continue
            if step > newest and fresh and not (path / ondisk.MARKER).exists():
                return step
        return None

    # -- process control ------------------------------------------------------------------------------

    def launch(self) -> None:
        sets = [a for o in [*self.overrides] for a in ("--set", o)]
        log = os.open(self.run_dir / "chaos-supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.launched_at = time.time()
            self.supervisor = psutil.Popen(
                [
                    sys.executable,
                    "-m",
                    "resilient.cli",
                    "run",
                    str(self.opts.config),
                    "--run-dir",
                    str(self.run_dir),
                    *sets,
                ],
                cwd=REPO,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "RESILIENT_NODE_NAME": self.node_name, "PYTHONWARNINGS": "ignore"},
            )
        finally:
            os.close(log)

    def mount_fill_fs(self) -> None:
        if self.fill_mount is None:
            return
        self.fill_mount.mkdir(mode=0o700, exist_ok=True)
        if not os.path.ismount(self.fill_mount):
            subprocess.run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={self.opts.fill_size_mb}m,mode=0700",
                    "tmpfs",
                    str(self.fill_mount),
                ],
                check=True,
                capture_output=True,
            )

    def unmount_fill_fs(self) -> None:
        if self.fill_mount is not None and os.path.ismount(self.fill_mount):
            subprocess.run(["umount", "-l", str(self.fill_mount)], check=False, capture_output=True)

    # -- following the run ----------------------------------------------------------------------------

    def _tail(self, name: str, path: Path, into: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """New complete records of a JSONL file since the last call."""
        try:
            with open(path, "rb") as f:
                f.seek(self._offsets[name])
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self._offsets[name] += end
        new = [rec for line in chunk[:end].splitlines() if (rec := _parse(line)) is not None]
        into.extend(new)
        return new

    def follow(self) -> list[dict[str, Any]]:
        """Read what the run wrote since the last call; returns the new ledger records."""
        for rec in self._tail("train", RunDir(self.run_dir).train_log, self.train_records):
            if "loss" in rec:
                self.step = rec["step"]
                self.first_step_ts = self.first_step_ts or rec["ts"]
        return self._tail("ledger", RunDir(self.run_dir).ledger, self.ledger_records)


@dataclass
class Pending:
    fault: Fault
    injection: Injection


def run_drill(
    opts: DrillOptions, schedule: list[Trigger], faults: list[str], *, seed: int, reference_digest: str | None = None
) -> dict[str, Any]:
    """Run the schedule to the end of the run; returns the report (see `checks.verdicts`)."""
    d = Drill(opts, faults, seed)
    instances = {name: FAULTS[name]() for name in faults}
    injections: list[Injection] = []
    pending: list[Pending] = []
    not_injected: list[dict[str, Any]] = []
    triggers = list(schedule)
    # Step-triggered faults the ranks inflict on themselves are armed up front for exactly their step.
    for trig in [t for t in triggers if instances[t.fault].armed_ahead and t.by == "step"]:
        fault = instances[trig.fault]
        inj = Injection(trig.fault, time.time(), int(trig.at), None, {**fault.arm_at(d, int(trig.at)), "armed": True})
        injections.append(inj)
        pending.append(Pending(fault, inj))
        triggers.remove(trig)
    started = time.monotonic()
    waiting_since: float | None = None
    d.mount_fill_fs()
    try:
        d.launch()
        while True:
            code = d.supervisor.poll()
            for rec in d.follow():
                for p in list(pending):
                    if rec.get("ts", 0) >= p.injection.ts and p.fault.detects(p.injection, rec, d):
                        p.injection.detected_event, p.injection.detected_ts = rec["event"], rec["ts"]
                        p.fault.cleanup(d, p.injection)
                        pending.remove(p)
            now = time.monotonic()
            for p in [p for p in pending if not p.injection.details.get("armed")]:
                if time.time() - p.injection.ts > opts.detect_timeout_s:
                    p.fault.cleanup(d, p.injection)
                    pending.remove(p)
            if code is not None:
                d.exit_codes.append(code)
                if code not in RELAUNCH or len(d.exit_codes) >= opts.max_launches:
                    break
                if code == ExitCode.UNHEALTHY_NODE and d.fake_nvml_file is not None:
                    d.fake_nvml_file.unlink(missing_ok=True)  # the requeue lands on a repaired node
                d.launch()
                continue
            if now - started > opts.timeout_s:
                d.timed_out = d.where_it_stands()
                d.supervisor.send_signal(signal.SIGTERM)
                d.exit_codes.append(_wait(d.supervisor, 60))
                break
            live = [p for p in pending if not p.injection.details.get("armed")]
            if triggers and not live:
                trig = triggers[0]
                training_s = None if d.first_step_ts is None else time.time() - d.first_step_ts
                if due(trig, step=d.step, training_seconds=training_s):
                    fault = instances[trig.fault]
                    waiting_since = waiting_since or now
                    if fault.ready(d):
                        inj = Injection(trig.fault, time.time(), d.step, d.attempt(), {})
                        inj.details = fault.inject(d)
                        ledger.append(d.run_dir, LedgerEvent.CHAOS_FAULT, kind=trig.fault, step=d.step, **inj.details)
                        injections.append(inj)
                        pending.append(Pending(fault, inj))
                        triggers.pop(0)
                        waiting_since = None
                    elif now - waiting_since > fault.ready_timeout_s:
                        not_injected.append({"kind": trig.fault, "at": trig.at, "by": trig.by})
                        triggers.pop(0)
                        waiting_since = None
            time.sleep(POLL_S)
        d.follow()
        for p in pending:
            p.fault.cleanup(d, p.injection)
        return _report(d, injections, not_injected, instances, reference_digest, seed)
    finally:
        if d.supervisor is not None and d.supervisor.poll() is None:
            d.supervisor.kill()
            d.supervisor.wait()
        d.unmount_fill_fs()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:  # a line torn by a writer killed mid-write
        return None


def _wait(proc: psutil.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
        return proc.wait()


def final_digest(ckpt_root: Path, step: int) -> str | None:
    """Digest of the committed checkpoint of `step` (None when there is none)."""
    from trainer.checkpoint.inspect import digest

    if step not in ondisk.committed_steps(ckpt_root):
        return None
    return digest(ondisk.step_dir(ckpt_root, step))


def _report(
    d: Drill,
    injections: list[Injection],
    not_injected: list[dict[str, Any]],
    instances: dict[str, Fault],
    reference_digest: str | None,
    seed: int,
) -> dict[str, Any]:
    finished = bool(d.exit_codes) and d.exit_codes[-1] == ExitCode.FINISHED
    end_ts = max((r.get("ts", 0) for r in d.ledger_records), default=time.time())
    gp = run_goodput(d.run_dir, now=end_ts)
    expected_n, expected_s = checks.recomputed_executions(d.train_records)
    report: dict[str, Any] = {
        "run_dir": str(d.run_dir),
        "seed": seed,
        "finished": finished,
        "exit_codes": d.exit_codes,
        "timed_out": d.timed_out,
        "launches": len(d.exit_codes),
        "final_step": d.step,
        "digest": final_digest(d.ckpt_root, d.cfg.train.steps) if finished else None,
        "faults": [i.to_json() for i in injections],
        "not_injected": not_injected,
        "false_alarms": checks.false_alarms(
            [r for r in d.ledger_records if r.get("event") == "failure"], [instances[i.kind].causes for i in injections]
        ),
        "orphans": checks.orphans(d.run_dir, wait_s=d.opts.orphan_wait_s, exclude=[os.getpid()]),
        "goodput": {
            "ratio": round(gp.ratio, 4),
            "wall_s": round(gp.wall_seconds, 3),
            "productive_s": round(gp.productive_seconds, 3),
            "badput_s": {k: round(v, 3) for k, v in gp.badput_seconds.items()},
            "productive_steps": gp.productive_steps,
            "recomputed_steps": gp.recomputed_steps,
            "failed_saves": gp.failed_saves,
            "expected_recomputed_steps": expected_n,
            "expected_lost_s": round(expected_s, 3),
            "lost_progress_matches": gp.recomputed_steps == expected_n
            and abs(gp.badput_seconds.get("lost_progress", 0.0) - expected_s) < 1e-6,
        },
    }
    same_bits = not any(instances[i.kind].loses_data for i in injections)
    report["expect_same_digest"] = same_bits
    report["failed_checks"] = checks.verdicts(report, reference_digest=reference_digest, expect_same_digest=same_bits)
    report["passed"] = not report["failed_checks"]
    return report
