"""Health reports judged into typed verdicts (a pure decision), and the verdicts' ledger records."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Literal

from health.types import HealthReport, Severity
from resilient.core import ledger
from resilient.core.events import LedgerEvent
from resilient.core.exit_codes import ExitCode


class Verdict(str, Enum):  # noqa: UP042 (StrEnum would change str() and format() of a verdict)
    """What a health report means for this node's attempt."""

    HEALTHY = "healthy"
    WARNING = "warning"
    """Recorded; training goes on."""
    UNHEALTHY = "unhealthy"
    """The node is unfit: the attempt ends, the job exits UNHEALTHY_NODE and is requeued without the node."""
    STORAGE = "storage"
    """The checkpoint filesystem is low or failing: save while there is room, stop STORAGE_FAULT; the node is fine."""


# Checks about the checkpoint filesystem, not the node: a full shared filesystem must never exclude
# a healthy node (requeueing elsewhere finds the same full disk).
STORAGE_CHECKS = frozenset({"node.ckpt_dir"})

_EXIT_CODES = {Verdict.UNHEALTHY: ExitCode.UNHEALTHY_NODE, Verdict.STORAGE: ExitCode.STORAGE_FAULT}


@dataclass(frozen=True)
class HealthVerdict:
    """A health report judged: the verdict, the checks behind it (those of the worst severity), and why."""

    verdict: Verdict
    reason: str
    checks: tuple[str, ...] = ()

    @property
    def ends_attempt(self) -> bool:
        return self.verdict in _EXIT_CODES

    @property
    def exit_code(self) -> ExitCode | None:
        """The supervisor's exit code when the verdict ends the job on this node."""
        return _EXIT_CODES.get(self.verdict)


def decide_health(report: HealthReport, phase: Literal["preflight", "training", "check"]) -> HealthVerdict:
    """fatal -> UNHEALTHY (fatal storage checks only: STORAGE); warn -> WARNING; ok -> HEALTHY."""
    severity, reason = report.verdict()
    worst = tuple(sorted(r.name for r in report.results if r.severity is severity and severity is not Severity.OK))
    if severity is Severity.FATAL and set(worst) <= STORAGE_CHECKS:
        return HealthVerdict(Verdict.STORAGE, f"storage ({phase}) {reason}", worst)
    if severity is Severity.FATAL:
        return HealthVerdict(Verdict.UNHEALTHY, f"unhealthy ({phase}) {reason}", worst)
    if severity is Severity.WARN:
        return HealthVerdict(Verdict.WARNING, f"warning ({phase}) {reason}", worst)
    return HealthVerdict(Verdict.HEALTHY, reason)


def record(run_dir: Path, report: HealthReport) -> int:
    """Append one `health` ledger event per non-ok result; returns how many were written."""
    bad = [r for r in report.results if r.severity is not Severity.OK]
    for r in bad:
        ledger.append(
            run_dir, LedgerEvent.HEALTH, node=report.node, severity=str(r.severity), check=r.name, reason=r.reason
        )
    return len(bad)
