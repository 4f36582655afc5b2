"""What the supervisor does with a health verdict (a pure decision), and the verdict's ledger records."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from health.types import HealthReport, Severity
from resilient.core import ledger
from resilient.core.events import LedgerEvent
from resilient.core.exit_codes import ExitCode


class Action(str, Enum):
    CONTINUE = "continue"
    RECORD = "record"
    STOP = "stop"
    SAVE_AND_STOP = "save_and_stop"
    """Storage trouble: save while there is still room, stop with STORAGE_FAULT; the node is fine."""

# Checks about the checkpoint filesystem, not the node: a full shared filesystem must never exclude
# a healthy node (requeueing elsewhere finds the same full disk).
STORAGE_CHECKS = frozenset({"node.ckpt_dir"})


@dataclass(frozen=True)
class HealthDecision:
    action: Action
    reason: str
    exit_code: ExitCode | None = None
    """Set when the action ends the supervisor."""


def decide_health(report: HealthReport, phase: Literal["preflight", "training"]) -> HealthDecision:
    """fatal -> stop with UNHEALTHY_NODE (fatal storage checks only: save and stop with STORAGE_FAULT);
    warn -> record; ok -> continue."""
    severity, reason = report.verdict()
    fatal = {r.name for r in report.results if r.severity is Severity.FATAL}
    if fatal and fatal <= STORAGE_CHECKS:
        return HealthDecision(Action.SAVE_AND_STOP, f"storage ({phase}) {reason}", ExitCode.STORAGE_FAULT)
    if severity is Severity.FATAL:
        return HealthDecision(Action.STOP, f"unhealthy ({phase}) {reason}", ExitCode.UNHEALTHY_NODE)
    if severity is Severity.WARN:
        return HealthDecision(Action.RECORD, f"warning ({phase}) {reason}")
    return HealthDecision(Action.CONTINUE, reason)


def record(run_dir: Path, report: HealthReport) -> int:
    """Append one `health` ledger event per non-ok result; returns how many were written."""
    bad = [r for r in report.results if r.severity is not Severity.OK]
    for r in bad:
        ledger.append(run_dir, LedgerEvent.HEALTH, node=report.node, severity=str(r.severity), check=r.name, reason=r.reason)
    return len(bad)
