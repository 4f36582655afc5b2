"""What the supervisors tell the coordinator when an attempt ends: each node's report and the job's stop request.

Typed here, encoded for the sealed store only in `wire.py`; the coordinator decides over them in `decisions.py`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class NodeOutcome(enum.StrEnum):
    """How an attempt ended on one node."""

    FINISHED = "finished"
    FAILED = "failed"
    PREEMPTED = "preempted"
    UNHEALTHY = "unhealthy"


@dataclass(frozen=True)
class RankExit:
    """A rank's exit code (or the code its `error` heartbeat announced) with the failure's reason."""

    code: int
    reason: str


@dataclass(frozen=True)
class NodeReport:
    """One node's account of how an attempt ended on it."""

    node: int
    """The node rank."""
    outcome: NodeOutcome
    start_step: int | None = None
    """Highest step its ranks resumed from (exit-only ranks: the newest complete checkpoint at the start)."""
    reached_step: int | None = None
    """Highest step its ranks completed (exit-only ranks: the newest complete checkpoint at the end)."""
    unhealthy: str | None = None
    """Why this node must not run ranks again (a fatal health verdict, a rank exiting UNHEALTHY_NODE);
    set exactly when `outcome` is UNHEALTHY."""
    final_rank_exit: RankExit | None = None
    """A rank's CONFIG_ERROR or CHECKPOINT_DAMAGED: no restart can change it, the run ends with that code."""
    slot: int | None = None
    """The slot whose supervisor ran the node rank (a report from a replaced slot is not taken)."""

    def __post_init__(self) -> None:
        if (self.outcome is NodeOutcome.UNHEALTHY) != (self.unhealthy is not None):
            raise ValueError(f"node {self.node}: outcome {self.outcome} with unhealthy={self.unhealthy!r}")


class StopKind(enum.StrEnum):
    """Why every node was asked to stop."""

    PREEMPTED = "preempted"
    """A signal to a supervisor, a rank exiting PREEMPTED, or a stop seen from another node: save and requeue."""
    STORAGE = "storage"
    """The checkpoint filesystem is low, full or failing: save while there is room, end STORAGE_FAULT."""


@dataclass(frozen=True)
class StopRequest:
    """The job's first stop request, with its authenticated origin."""

    kind: StopKind
    reason: str
    node: int
    """The node whose supervisor asked."""
    pid: int
    host: str
