"""What the supervisor does with a health verdict and with persistent stragglers (pure decisions)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from health.types import HealthReport, Severity
from resilient.core import ledger
from resilient.core.exit_codes import ExitCode
from resilient.core.events import LedgerEvent


class Action(str, Enum):
    CONTINUE = "continue"
    RECORD = "record"
    STOP = "stop"
    EXCLUDE = "exclude"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    exit_code: ExitCode | None = None
    """Set when the action ends the supervisor."""


def decide(report: HealthReport, phase: Literal["preflight", "training"]) -> Decision:
    """fatal -> stop with UNHEALTHY_NODE; warn -> record; ok -> continue."""
    severity, reason = report.verdict()
    if severity is Severity.FATAL:
        return Decision(Action.STOP, f"unhealthy ({phase}) {reason}", ExitCode.UNHEALTHY_NODE)
    if severity is Severity.WARN:
        return Decision(Action.RECORD, f"warning ({phase}) {reason}")
    return Decision(Action.CONTINUE, reason)


def decide_stragglers(persistent: list[tuple[int, float, str]], policy: Literal["record", "exclude"]) -> Decision:
    """Persistent stragglers are recorded; with policy "exclude" their nodes are also excluded on requeue."""
    if not persistent:
        return Decision(Action.CONTINUE, "no persistent stragglers")
    what = "; ".join(reason for _, _, reason in persistent)
    return Decision(Action.EXCLUDE if policy == "exclude" else Action.RECORD, what)


def record(run_dir: Path, report: HealthReport) -> int:
    """Append one `health` ledger event per non-ok result; returns how many were written."""
    bad = [r for r in report.results if r.severity is not Severity.OK]
    for r in bad:
        ledger.append(run_dir, LedgerEvent.HEALTH, node=report.node, severity=str(r.severity), check=r.name, reason=r.reason)
    return len(bad)
