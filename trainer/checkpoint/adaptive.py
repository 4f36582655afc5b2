"""Each checkpoint tier's current interval, and with `adaptive` its changes: measure each save's cost to
the loop, agree across ranks, set the interval to Daly's optimum, record every change.

Every rank measures its own iterations; each decision all-reduces (max) the measurements, so all ranks
take the same decision at the same step without rank 0 sending anything. Decisions are taken when a
save's cost window closes (the same iteration on every rank) and once at start, from the newest
`ckpt_interval` ledger record (the interval chosen, the save cost and step time measured before the
restart: the new attempt continues from that interval) and the run's failure history (which the
supervisor passes in the rank environment, `RankEnv.history`): a failure that caused this restart moves
the interval before the first save of the new attempt. The checkpointer owns the one instance.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from resilient.core import ledger
from resilient.core.events import LedgerEvent
from resilient.rank.env import FailureHistory
from trainer.checkpoint import interval
from trainer.checkpoint.config import CheckpointConfig

log = logging.getLogger("trainer")

TIER_FIELDS = {"disk": "interval_steps", "memory": "memory_interval_steps"}
"""Each checkpoint tier and its interval field in CheckpointConfig. A tier adapts only when it is on
(its configured interval > 0); each has its own cost meter and its own Daly optimum."""


@dataclass(frozen=True)
class LastDecision:
    """The newest `ckpt_interval` record of a tier (zeros when there is none)."""

    cost_s: float = 0.0
    step_s: float = 0.0
    steps: int = 0
    configured: int | None = None
    """The tier's configured interval when it was recorded (None in records older than the field)."""


def last_decisions(run_dir: Path) -> dict[str, LastDecision]:
    """Each tier's newest `ckpt_interval` record, in one read of the ledger (a tier without one: zeros)."""
    last = dict.fromkeys(TIER_FIELDS, LastDecision())
    for rec in ledger.read(run_dir):
        if rec.get("event") == LedgerEvent.CKPT_INTERVAL and rec.get("tier") in last:
            last[rec["tier"]] = LastDecision(
                float(rec.get("save_cost_s") or 0.0),
                float(rec.get("step_s") or 0.0),
                int(rec.get("steps") or 0),
                rec.get("configured"),
            )
    return last


class AdaptiveInterval:
    """The one owner of each tier's current interval: the configured one, moved as `cfg.adaptive`
    decides. `cfg` itself never changes."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: Path,
        *,
        attempt: int,
        is_logger: bool,
        device: torch.device,
        history: FailureHistory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg, self.run_dir, self.attempt, self.is_logger = cfg, run_dir, attempt, is_logger
        self.device, self.clock = device, clock
        self.meters = {
            tier: interval.CostMeter(cfg.cost_window_steps) for tier, name in TIER_FIELDS.items() if getattr(cfg, name)
        }
        self.configured = {tier: getattr(cfg, name) for tier, name in TIER_FIELDS.items()}
        self.current = dict(self.configured)
        """Each tier's interval now (0: the tier is off)."""
        self.failures, self.exposure_s = history.failures, history.exposure_s
        self.started = clock()
        self._last_end: float | None = None

    @property
    def intervals(self) -> dict[str, int]:
        """Each tier's current interval (heartbeat field `ckpt_intervals`, the metric's source)."""
        return {tier: self.current[tier] for tier in self.meters}

    def start(self, step: int) -> None:
        """Before the first step (every rank): decide from what earlier attempts measured, if anything."""
        if not self.cfg.adaptive:
            return
        last = last_decisions(self.run_dir)  # before this attempt writes
        for tier, meter in self.meters.items():
            meter.seed(last[tier].cost_s)
            self._restore(tier, step, last[tier])
            self._decide(
                tier,
                step,
                last[tier].cost_s,
                last[tier].step_s,
                why="at start, from the last measurement and the failure history",
            )
        self._last_end = self.clock()

    def iteration_done(
        self, step: int, saved: str | None, in_flight: bool, excluded_s: float = 0.0, blocking_s: float = 0.0
    ) -> None:
        """At the end of each loop iteration (every rank): `saved` names the tier this iteration saved
        to; `in_flight` while a disk save's background write is unfinished (the same on every rank:
        finalizing is collective). A memory snapshot's window is its fixed `cost_window_steps`: its
        background work (checksum, replica) ends at different times on different ranks, and every
        rank must close the window at the same step. `excluded_s` (evaluation) is not loop time a save
        could have cost. `blocking_s`: how long the save blocked the loop (the least it cost)."""
        if not self.cfg.adaptive:
            return
        now = self.clock()
        seconds = now - (self._last_end if self._last_end is not None else now) - excluded_s
        self._last_end = now
        if saved in self.meters:
            self.meters[saved].saved(blocking_s)
        quiet = saved is None and not in_flight
        for tier, meter in self.meters.items():
            if meter.iteration(max(0.0, seconds), in_flight and tier == "disk", quiet):
                self._decide(tier, step, meter.cost(), meter.baseline(), why=f"save cost measured at step {step}")

    def _restore(self, tier: str, step: int, last: LastDecision) -> None:
        """Take up the interval the previous attempts chose (within this config's bounds), so that a
        restart continues from it rather than from the configured start; hysteresis then applies to it.
        An operator who changed the configured interval since has the last word."""
        restored = interval.restored_interval(
            last.steps,
            last.configured,
            self.current[tier],
            min_steps=self.cfg.min_interval_steps,
            max_steps=self.cfg.max_interval_steps,
        )
        self._set(
            tier,
            step,
            restored,
            f"at start: the interval chosen before the restart ({last.steps} steps), restored",
            save_cost_s=last.cost_s,
            step_s=last.step_s,
            failures=self.failures,
            exposure_s=self.exposure_s,
        )

    def _decide(self, tier: str, step: int, cost: float, step_s: float, *, why: str) -> None:
        exposure = self.exposure_s + (self.clock() - self.started)
        agreed = torch.tensor([cost, step_s, float(self.failures), exposure], dtype=torch.float64, device=self.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        cost, step_s, failures, exposure = agreed.tolist()
        if step_s <= 0:
            return  # nothing measured yet: keep the configured interval
        mtbf, mtbf_why = interval.estimate_mtbf(self.cfg.prior_mtbf_hours * 3600, int(failures), exposure)
        steps, reason = interval.choose_interval(
            save_cost_s=cost,
            step_s=step_s,
            mtbf_s=mtbf,
            min_steps=self.cfg.min_interval_steps,
            max_steps=self.cfg.max_interval_steps,
        )
        if interval.worth_changing(
            self.current[tier], steps, min_steps=self.cfg.min_interval_steps, max_steps=self.cfg.max_interval_steps
        ):
            self._set(
                tier,
                step,
                steps,
                f"{why}: {reason}; {mtbf_why}",
                save_cost_s=cost,
                step_s=step_s,
                mtbf_s=mtbf,
                failures=int(failures),
                exposure_s=exposure,
            )

    def _set(self, tier: str, step: int, steps: int, reason: str, **measured: float) -> None:
        """Change `tier`'s interval to `steps` (if it differs): the interval, the log, the ledger."""
        previous = self.current[tier]
        if steps == previous:
            return
        self.current[tier] = steps
        log.info("checkpoint interval (%s) %d -> %d steps at step %d: %s", tier, previous, steps, step, reason)
        if self.is_logger:
            rounded = {k: round(v, 1 if k in ("mtbf_s", "exposure_s") else 4) for k, v in measured.items()}
            ledger.append(
                self.run_dir,
                LedgerEvent.CKPT_INTERVAL,
                tier=tier,
                steps=steps,
                previous=previous,
                configured=self.configured[tier],
                step=step,
                attempt=self.attempt,
                **rounded,
                reason=reason,
            )
