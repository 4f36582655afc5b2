"""The fault library: each fault acts on the real processes and files of a run and names the ledger
record that shows the run noticed it.

A fault is `ready` when the run is in a state where it means something (ranks training, a checkpoint
committed, a save in flight), `inject` acts and returns what it hit, `detects` says whether a ledger
record is the run's reaction to it, and `cleanup` undoes lasting damage once it was seen (a full disk is
freed, a duty-cycled rank resumed). Processes are found through RUN_DIR/status.json and checked with
psutil before any signal, so a recycled pid is never hit.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import psutil

from resilient.core.atomic import atomic_write
from resilient.core.rundir import RunDir
from trainer.checkpoint import ondisk

if TYPE_CHECKING:
    from resilient.chaos.runner import Drill


@dataclass
class Injection:
    """One fault as fired, and how the run reacted."""

    kind: str
    ts: float
    step: int | None
    attempt: int | None
    details: dict[str, Any] = field(default_factory=dict)
    detected_event: str | None = None
    detected_ts: float | None = None

    @property
    def latency_s(self) -> float | None:
        return None if self.detected_ts is None else round(self.detected_ts - self.ts, 3)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "ts": self.ts,
            "step": self.step,
            "attempt": self.attempt,
            **self.details,
            "detected_by": self.detected_event,
            "detection_latency_s": self.latency_s,
        }


class Fault:
    name: ClassVar[str]
    loses_data: ClassVar[bool] = False
    """True when the run, by design, ends on other bits than a fault-free run (NaN rollback skips data)."""
    ready_timeout_s: ClassVar[float] = 120.0
    """How long the runner waits for `ready` before recording the fault as not injected."""
    causes: ClassVar[frozenset[str]] = frozenset()
    """The ledger's `failure` kinds the fault sets off, at most one of each per injection: a drill with any
    other failure raised a false alarm (a restart the run paid for nothing). Unless `detects` says otherwise,
    such a failure is also how the drill sees that the run noticed the fault."""
    armed_ahead: ClassVar[bool] = False
    """With a step trigger, `arm_at` writes the fault into RUN_DIR/faults.json before the run starts, for
    exactly that step (the rank inflicts it on itself), instead of `inject` acting when the step passed."""

    def arm_at(self, d: Drill, step: int) -> dict[str, Any]:
        """Arm the fault for `step` ahead of time (`armed_ahead` faults); returns the injection's details."""
        raise NotImplementedError

    def ready(self, d: Drill) -> bool:
        return d.training()

    def inject(self, d: Drill) -> dict[str, Any]:
        raise NotImplementedError

    def detects(self, inj: Injection, rec: dict[str, Any], d: Drill) -> bool:
        """By default the run noticed the fault by the failure it sets off (a kind of its `causes`)."""
        return rec.get("event") == "failure" and rec.get("kind") in self.causes

    def cleanup(self, d: Drill, inj: Injection) -> None:
        """Undo lasting damage (called once the fault was detected, or given up on)."""


def _signal_rank(d: Drill, sig: signal.Signals) -> dict[str, Any]:
    rank, proc = d.pick_rank()
    proc.send_signal(sig)
    return {"rank": rank, "pid": proc.pid, "signal": sig.name}


class KillRank(Fault):
    """SIGKILL a random rank: the supervisor sees the exit and restarts every rank from the last checkpoint."""

    name = "kill_rank"
    causes = frozenset({"rank_exit"})

    def inject(self, d: Drill) -> dict[str, Any]:
        return _signal_rank(d, signal.SIGKILL)


class HangRank(Fault):
    """SIGSTOP a random rank: no more heartbeats; the step timeout declares a hang (the teardown's SIGKILL ends it)."""

    name = "hang_rank"
    causes = frozenset({"hang"})

    def inject(self, d: Drill) -> dict[str, Any]:
        return _signal_rank(d, signal.SIGSTOP)


class Preempt(Fault):
    """SIGTERM the supervisor, as Slurm does at preemption: save, exit PREEMPTED; the drill requeues it."""

    name = "preempt"

    def inject(self, d: Drill) -> dict[str, Any]:
        d.supervisor.send_signal(signal.SIGTERM)
        return {"pid": d.supervisor.pid, "signal": "SIGTERM"}

    def detects(self, inj: Injection, rec: dict[str, Any], d: Drill) -> bool:
        return rec.get("event") == "preempted"


class KillSupervisor(Fault):
    """SIGKILL the supervisor: its ranks die with it (PDEATHSIG); the drill relaunches, like a requeue."""

    name = "kill_supervisor"

    def inject(self, d: Drill) -> dict[str, Any]:
        d.supervisor.send_signal(signal.SIGKILL)
        return {"pid": d.supervisor.pid, "signal": "SIGKILL"}

    def detects(self, inj: Injection, rec: dict[str, Any], d: Drill) -> bool:
        return rec.get("event") == "run_start"


class KillDuringSave(Fault):
    """SIGKILL a rank while a checkpoint is being written (a step directory without its marker exists)."""

    name = "ckpt_write_kill"
    causes = frozenset({"rank_exit"})

    def ready(self, d: Drill) -> bool:
        return d.training() and d.save_in_flight() is not None

    def inject(self, d: Drill) -> dict[str, Any]:
        writing = d.save_in_flight()
        return {**_signal_rank(d, signal.SIGKILL), "writing_step": writing}


class CorruptCheckpoint(Fault):
    """Flip a byte in the newest checkpoint's largest shard, then SIGKILL a rank: the restart must notice
    the damage, quarantine it and fall back to the previous checkpoint."""

    name = "corrupt_ckpt"
    causes = frozenset({"rank_exit"})

    def ready(self, d: Drill) -> bool:
        return d.training() and d.save_in_flight() is None and len(ondisk.committed_steps(d.ckpt_root)) >= 2

    def inject(self, d: Drill) -> dict[str, Any]:
        step = ondisk.committed_steps(d.ckpt_root)[-1]
        shard = max(ondisk.step_dir(d.ckpt_root, step).glob("*.distcp"), key=lambda p: p.stat().st_size)
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        return {**_signal_rank(d, signal.SIGKILL), "corrupted_step": step, "file": shard.name}

    def detects(self, inj: Injection, rec: dict[str, Any], d: Drill) -> bool:
        return rec.get("event") == "ckpt_fallback" and rec.get("from_step") == inj.details["corrupted_step"]


class FillDisk(Fault):
    """Fill the checkpoint filesystem (a tmpfs the drill mounted as checkpoint.dir): saves must fail and
    be recorded while training goes on, or the health monitor stops the run as a storage fault; the
    space is freed once either was seen, and the run must still finish with the same bits."""

    name = "fill_disk"
    causes = frozenset({"storage"})
    FILLER = ".chaos-filler"

    def ready(self, d: Drill) -> bool:
        return d.training() and d.fill_mount is not None

    def inject(self, d: Drill) -> dict[str, Any]:
        path = d.ckpt_root / self.FILLER
        block, written = b"\0" * (1 << 20), 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while True:
                written += os.write(fd, block)
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(fd)
        return {"filled_bytes": written}

    def detects(self, inj: Injection, rec: dict[str, Any], d: Drill) -> bool:
        # A failed save, or the health monitor's storage fault (save-and-stop, exit STORAGE_FAULT) if it
        # saw the full filesystem first.
        return rec.get("event") in ("ckpt_save_failed", "storage_fault")

    def cleanup(self, d: Drill, inj: Injection) -> None:
        (d.ckpt_root / self.FILLER).unlink(missing_ok=True)


class SlowRank(Fault):
    """Duty-cycle SIGSTOP/SIGCONT on one rank until the supervisor flags it as a persistent straggler."""

    name = "straggler"
    STOP_S, RUN_S = 0.12, 0.04

    def __init__(self) -> None:
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def inject(self, d: Drill) -> dict[str, Any]:
        rank, proc = d.pick_rank()
        self._done.clear()
        self._thread = threading.Thread(target=self._cycle, args=(proc,), name="chaos-straggler", daemon=True)
        self._thread.start()
        return {
            "rank": rank,
            "pid": proc.pid,
            "duty_cycle": f"stopped {self.STOP_S}s of every {self.STOP_S + self.RUN_S:.2f}s",
        }

    def _cycle(self, proc: psutil.Process) -> None:
        try:
            while not self._done.is_set():
                proc.send_signal(signal.SIGSTOP)
                self._done.wait(self.STOP_S)
                proc.send_signal(signal.SIGCONT)
                self._done.wait(self.RUN_S)
        except psutil.Error:
            pass  # the rank is gone (a restart): nothing left to slow

    def detects(self, inj: Injection, rec: dict[str, Any], d: Drill) -> bool:
        return rec.get("event") == "straggler" and rec.get("rank") == inj.details["rank"]

    def cleanup(self, d: Drill, inj: Injection) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()


def _arm(run_dir: Path, kind: str, entry: dict[str, Any]) -> None:
    """Add an entry to RUN_DIR/faults.json, which the ranks read (trainer/injection.py)."""
    path = RunDir(run_dir).faults
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault(kind, []).append(entry)
    atomic_write(path, json.dumps(doc))


def _when_step_ran(inj: Injection, d: Drill, step: int, before_ts: float, *, nan: bool = False) -> None:
    """The fault happened when its step ran, not when it was armed: the train log's last NaN record of the
    step before the reaction (`nan`), else its first record after the arming."""
    ran = [
        r["ts"]
        for r in d.train_records
        if r.get("step") == step
        and "loss" in r
        and inj.ts <= r["ts"] <= before_ts
        and (not nan or (isinstance(r["loss"], float) and math.isnan(r["loss"])))
    ]
    if ran:
        inj.ts = ran[-1] if nan else ran[0]


class NanLoss(Fault):
    """Poison the loss of a step through RUN_DIR/faults.json: the trainer must roll back and skip the window.

    With a step trigger the entry is written before launch for exactly that step (any attempt), so a rerun
    of the schedule poisons the same step; with a time trigger it targets a step just ahead of the run."""

    name = "nan_loss"
    loses_data = True
    armed_ahead = True
    AHEAD = 3

    def ready(self, d: Drill) -> bool:
        return d.training() and bool(ondisk.committed_steps(d.ckpt_root))

    def arm(self, run_dir: Path, step: int, attempt: int | None) -> None:
        _arm(run_dir, "nan_loss", {"step": step} if attempt is None else {"step": step, "attempt": attempt})

    def arm_at(self, d: Drill, step: int) -> dict[str, Any]:
        self.arm(d.run_dir, step, None)
        return {"target_step": step}

    def inject(self, d: Drill) -> dict[str, Any]:
        step = d.step + self.AHEAD
        self.arm(d.run_dir, step, d.attempt())
        return {"target_step": step}

    def detects(self, inj: Injection, rec: dict[str, Any], d: Drill) -> bool:
        if rec.get("event") != "numeric_fault" or rec.get("step") != inj.details["target_step"]:
            return False
        _when_step_ran(inj, d, rec["step"], rec["ts"], nan=True)
        return True


class BitFlip(Fault):
    """Flip one bit in one rank's weights (or gradients, or an activation: the drill's `bitflip_target`)
    at a step, in the rank's own process, through RUN_DIR/faults.json: replica agreement or a re-execution
    must name that rank (`sdc_confirmed`), and the run must still end on the fault-free bits.

    With a step trigger the flip is armed before launch for that step in the run's next attempt (a restart
    that computes the step again must not flip it again); with a time trigger, just ahead of the run."""

    name = "bitflip"
    causes = frozenset({"rank_error"})  # a rank reports the finding, which ends the attempt
    armed_ahead = True
    AHEAD = 3

    def _arm(self, d: Drill, step: int, attempt: int) -> dict[str, Any]:
        world = d.cfg.nodes * d.cfg.supervisor.nproc_per_node
        entry: dict[str, Any] = {
            "step": step,
            "rank": d.rng.randrange(world),
            "attempt": attempt,
            "target": d.opts.bitflip_target,
        }
        if d.opts.bitflip_bit is not None:
            entry["bit"] = d.opts.bitflip_bit
        _arm(d.run_dir, "bitflip", entry)
        return {"target_step": step, "rank": entry["rank"], "target": entry["target"], "bit": entry.get("bit")}

    def arm_at(self, d: Drill, step: int) -> dict[str, Any]:
        return self._arm(d, step, d.next_attempt())

    def inject(self, d: Drill) -> dict[str, Any]:
        return self._arm(d, d.step + self.AHEAD, d.attempt() or 0)

    def detects(self, inj: Injection, rec: dict[str, Any], d: Drill) -> bool:
        if (
            rec.get("event") != "sdc_confirmed"
            or inj.details["rank"] not in rec.get("ranks", [])
            or rec.get("step", -1) < inj.details["target_step"]
        ):
            return False
        inj.details["found_at_step"] = rec["step"]
        _when_step_ran(inj, d, inj.details["target_step"], rec["ts"])
        return True


class GpuHealth(Fault):
    """Script an XID 79 (GPU fell off the bus) into the fake NVML state of the node: the health monitor
    must stop the ranks; the node then fails pre-flight and the supervisor exits UNHEALTHY_NODE, which
    the drill treats as a requeue onto a repaired node (the scripted state is cleared before relaunch)."""

    name = "gpu_health"
    causes = frozenset({"health"})  # the drill clears the state when the supervisor exits UNHEALTHY_NODE

    def ready(self, d: Drill) -> bool:
        return d.training() and d.fake_nvml_file is not None

    def inject(self, d: Drill) -> dict[str, Any]:
        state = {"devices": [{"index": 0, "xids": [79]}]}
        atomic_write(d.fake_nvml_file, json.dumps(state))
        return {"node": d.node_name, "xid": 79}


FAULTS: dict[str, type[Fault]] = {
    f.name: f
    for f in (
        KillRank,
        HangRank,
        Preempt,
        KillSupervisor,
        KillDuringSave,
        CorruptCheckpoint,
        FillDisk,
        SlowRank,
        NanLoss,
        GpuHealth,
        BitFlip,
    )
}
