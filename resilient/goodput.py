"""Goodput of a run from its ledger and train log: productive training time over wall time.

Wall time runs from the first `run_start` to `now`, across in-job restarts and requeued
allocations. Badput is split as Google's ml-goodput-measurement does:

- startup: rank start -> ready to train (`rank_init`, slowest rank of each attempt)
- checkpoint_save: training blocked by saves (`ckpt_save.blocking_seconds`)
- checkpoint_restore: loading a checkpoint (`ckpt_load`, slowest rank of each attempt)
- lost_progress: step time of steps computed again after a failure (every occurrence of a step in
  the train log but the last)
- waiting: restart back-off and the queue gap between a requeued allocation's `run_start` and the
  previous allocation's last record
- other: the rest (failure detection, teardown, evaluation, data stalls between steps)

Pure: no I/O, `now` is injected.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

BADPUT_CATEGORIES = ("startup", "checkpoint_save", "checkpoint_restore", "lost_progress", "waiting", "other")

Record = Mapping[str, Any]


@dataclass(frozen=True)
class GoodputReport:
    """Time accounting of a run at `now`, plus the checkpoint facts the ledger knows."""

    now: float
    wall_seconds: float
    productive_seconds: float
    badput_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds per category of BADPUT_CATEGORIES."""
    productive_steps: int = 0
    recomputed_steps: int = 0
    """Step executions thrown away by failures (earlier occurrences of recomputed steps)."""
    last_checkpoint_step: int | None = None
    last_checkpoint_ts: float | None = None
    failed_saves: int = 0
    sdc_findings: int = 0
    """Silent data corruption findings that named a rank (`sdc_confirmed`) in the run."""

    @property
    def ratio(self) -> float:
        return self.productive_seconds / self.wall_seconds if self.wall_seconds > 0 else 0.0


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _allocation_index(ledger: list[Record]) -> list[int]:
    """For each ledger record, the index of the allocation it belongs to.

    Every node's supervisor writes a `run_start`; a new allocation begins when the Slurm job id or
    restart count changes, or when a node starts a second time under the same key (a manual resume).
    """
    out, alloc, key, nodes = [], -1, object(), set()
    for rec in ledger:
        if rec.get("event") == "run_start":
            rec_key = (rec.get("slurm_job_id"), rec.get("slurm_restart_count"))
            node = rec.get("node")
            if rec_key != key or node in nodes:
                alloc, key, nodes = alloc + 1, rec_key, set()
            nodes.add(node)
        out.append(max(alloc, 0))
    return out


def _slowest_per_attempt(ledger: list[Record], allocs: list[int], event: str, value_key: str) -> float:
    """Sum over (allocation, attempt) of the largest `value_key` among `event` records (ranks run in parallel)."""
    worst: dict[tuple[int, Any], float] = defaultdict(float)
    for rec, alloc in zip(ledger, allocs, strict=True):
        if rec.get("event") == event:
            slot = (alloc, rec.get("attempt"))
            worst[slot] = max(worst[slot], _num(rec.get(value_key)))
    return sum(worst.values())


def _queue_seconds(ledger: list[Record], allocs: list[int], train_ts: list[float]) -> float:
    """Gaps between each requeued allocation's first `run_start` and the last record before it."""
    firsts = {}
    for rec, alloc in zip(ledger, allocs, strict=True):
        if rec.get("event") == "run_start" and alloc not in firsts:
            firsts[alloc] = _num(rec.get("ts"))
    all_ts = sorted([_num(r.get("ts")) for r in ledger] + train_ts)
    total = 0.0
    for alloc, start in firsts.items():
        i = bisect_left(all_ts, start)
        if alloc > 0 and i > 0:
            total += start - all_ts[i - 1]
    return total


def _step_times(train_log: list[Record]) -> tuple[float, int, float, int]:
    """(productive seconds, productive steps, lost seconds, recomputed executions) from the train log."""
    steps = [r for r in train_log if "step_time" in r and "step" in r]
    last = {r["step"]: i for i, r in enumerate(steps)}
    productive = lost = 0.0
    n_lost = 0
    for i, rec in enumerate(steps):
        if last[rec["step"]] == i:
            productive += _num(rec["step_time"])
        else:
            lost += _num(rec["step_time"])
            n_lost += 1
    return productive, len(last), lost, n_lost


def compute_goodput(ledger_records: Iterable[Record], train_log_records: Iterable[Record], now: float) -> GoodputReport:
    """Goodput and badput of the run described by the ledger and train log, as of `now`."""
    ledger = list(ledger_records)
    train_log = list(train_log_records)
    starts = [_num(r.get("ts")) for r in ledger if r.get("event") == "run_start"]
    saves = [r for r in ledger if r.get("event") == "ckpt_save"]
    last_save = max(saves, key=lambda r: _num(r.get("ts")), default=None)
    failed_saves = sum(r.get("event") == "ckpt_save_failed" for r in ledger)
    sdc_findings = sum(r.get("event") == "sdc_confirmed" for r in ledger)
    if not starts:
        return GoodputReport(
            now=now,
            wall_seconds=0.0,
            productive_seconds=0.0,
            badput_seconds=dict.fromkeys(BADPUT_CATEGORIES, 0.0),
            failed_saves=failed_saves,
            sdc_findings=sdc_findings,
        )

    allocs = _allocation_index(ledger)
    productive, n_steps, lost, n_lost = _step_times(train_log)
    restart_backoff = _slowest_per_attempt(ledger, allocs, "restart", "backoff_seconds")
    badput = {
        "startup": _slowest_per_attempt(ledger, allocs, "rank_init", "seconds"),
        "checkpoint_save": sum(_num(r.get("blocking_seconds")) for r in saves),
        "checkpoint_restore": _slowest_per_attempt(ledger, allocs, "ckpt_load", "seconds"),
        "lost_progress": lost,
        "waiting": restart_backoff + _queue_seconds(ledger, allocs, [_num(r.get("ts")) for r in train_log]),
    }
    wall = max(0.0, now - starts[0])
    badput["other"] = max(0.0, wall - productive - sum(badput.values()))
    return GoodputReport(
        now=now,
        wall_seconds=wall,
        productive_seconds=productive,
        badput_seconds=badput,
        productive_steps=n_steps,
        recomputed_steps=n_lost,
        last_checkpoint_step=None if last_save is None else last_save.get("step"),
        last_checkpoint_ts=None if last_save is None else _num(last_save.get("ts")),
        failed_saves=failed_saves,
        sdc_findings=sdc_findings,
    )


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    return f"{m}m {s:02d}s" if m else f"{s}s"


def render(report: GoodputReport) -> str:
    """A few human lines for `resilient status`."""
    if report.wall_seconds <= 0:
        return "goodput: n/a (the run has not started)"
    lines = [
        f"goodput {report.ratio:.1%} of {_duration(report.wall_seconds)} wall "
        f"(productive {_duration(report.productive_seconds)}, {report.productive_steps} steps, "
        f"{report.recomputed_steps} recomputed)",
        "badput: "
        + ", ".join(
            f"{cat.replace('_', ' ')} {_duration(report.badput_seconds.get(cat, 0.0))}" for cat in BADPUT_CATEGORIES
        ),
    ]
    if report.last_checkpoint_ts is not None:
        lines.append(
            f"last complete checkpoint: step {report.last_checkpoint_step}, "
            f"{_duration(report.now - report.last_checkpoint_ts)} ago"
            + (f"; {report.failed_saves} failed saves" if report.failed_saves else "")
        )
    elif report.failed_saves:
        lines.append(f"no complete checkpoint; {report.failed_saves} failed saves")
    return "\n".join(lines)
