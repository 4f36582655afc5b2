"""Result types shared by every health check: one CheckResult per check, a HealthReport per node."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any


class Severity(IntEnum):
    """How bad a check result is; ordered so that `max()` gives the worst."""

    OK = 0
    WARN = 1
    FATAL = 2

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: a dotted name (gpu.xid, node.ckpt_dir), severity, one-line reason, measurements."""

    name: str
    severity: Severity
    reason: str
    values: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    """True when the check could not run here (no NVML, no GPU); the severity is then OK."""

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "severity": str(self.severity)}


def ok(name: str, reason: str, **values: Any) -> CheckResult:
    return CheckResult(name, Severity.OK, reason, values)


def warn(name: str, reason: str, **values: Any) -> CheckResult:
    return CheckResult(name, Severity.WARN, reason, values)


def fatal(name: str, reason: str, **values: Any) -> CheckResult:
    return CheckResult(name, Severity.FATAL, reason, values)


def skipped(name: str, reason: str, **values: Any) -> CheckResult:
    return CheckResult(name, Severity.OK, f"skipped: {reason}", values, skipped=True)


@dataclass(frozen=True)
class HealthReport:
    """All check results of one node at one moment."""

    node: str
    results: list[CheckResult]
    ts: float = field(default_factory=time.time)

    def worst(self) -> Severity:
        return max((r.severity for r in self.results), default=Severity.OK)

    def verdict(self) -> tuple[Severity, str]:
        """The worst severity and a one-line reason naming the node and the failing checks."""
        worst = self.worst()
        if worst is Severity.OK:
            ran = sum(not r.skipped for r in self.results)
            return worst, f"node {self.node}: healthy ({ran} checks passed, {len(self.results) - ran} skipped)"
        bad = [r for r in self.results if r.severity is worst]
        return worst, f"node {self.node}: " + "; ".join(f"{r.name}: {r.reason}" for r in bad)

    def to_json(self) -> dict[str, Any]:
        severity, reason = self.verdict()
        return {
            "node": self.node,
            "ts": self.ts,
            "severity": str(severity),
            "reason": reason,
            "results": [r.to_json() for r in self.results],
        }
