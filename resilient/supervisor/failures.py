"""Failure detection: a rank's exit, a hang (calibrated timeouts), an error the rank reported.

Each detector returns a `Failure` record or None; the supervisor posts the first one of an attempt.
The timeouts and the blame are pure functions in `timeouts`; this module reads the processes.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from resilient.supervisor import timeouts
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.ranks import RankProcess
from resilient.supervisor.reports import RankExit
from resilient.supervisor.tracking import HeartbeatTracker


class FailureKind(enum.StrEnum):
    """What went wrong (the ledger's `kind`, a metrics label)."""

    RANK_EXIT = "rank_exit"
    """A rank exited non-zero or was killed by a signal."""
    HANG = "hang"
    """A rank made no heartbeat progress within its phase's timeout."""
    RANK_ERROR = "rank_error"
    """A rank reported phase `error`."""
    HEALTH = "health"
    """A fatal health verdict for this node (pre-flight or monitor)."""
    NODE_LOST = "node_lost"
    """A node's lease expired (its host frozen, cut off or dead): the coordinator's finding."""
    STORAGE = "storage"
    """The checkpoint filesystem is low, full or failing: save and stop (STORAGE_FAULT), never a node fault."""
    SUPERVISOR = "supervisor"
    """The supervisor itself: lost coordination, an unexpected exception."""


@dataclass(frozen=True)
class Failure:
    """One failure of an attempt, as recorded in the ledger and status.json."""

    kind: FailureKind
    rank: int | None
    node: int
    step: int | None
    reason: str
    latency_s: float = 0.0
    """Detection latency: from the event (exit noticed, last progress) to the decision."""
    incident: str | None = None
    """The evidence directory (RUN_DIR-relative) the supervisor collected before teardown, if any."""

    def record(self) -> dict[str, Any]:
        """The ledger/status form (`latency_seconds`, rounded)."""
        fields = asdict(self)
        fields["kind"] = str(self.kind)
        fields["latency_seconds"] = round(fields.pop("latency_s"), 3)
        if fields["incident"] is None:
            del fields["incident"]
        return fields


def reported_error(tracker: HeartbeatTracker, node: int) -> Failure | None:
    """A rank whose last heartbeat was phase `error`."""
    for view in tracker.views.values():
        if view.error is not None:
            return Failure(
                FailureKind.RANK_ERROR,
                view.rank,
                node,
                tracker.current_step(),
                f"rank {view.rank} reported an error: {view.error}",
            )
    return None


def exit_failure(exits: Sequence[RankProcess], node: int, step: int | None, now: float) -> Failure | None:
    """The first rank among `exits` (just reaped) that did not exit 0."""
    for r in exits:
        code = r.returncode
        if code is None or code == 0:
            continue
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return Failure(
            FailureKind.RANK_EXIT,
            r.spec.rank,
            node,
            step,
            f"rank {r.spec.rank} (pid {r.pid}) {how}",
            now - (r.exited_at or now),
        )
    return None


def rank_exit(failure: Failure, exits: Sequence[RankProcess], tracker: HeartbeatTracker) -> RankExit | None:
    """The code the rank of `failure` exited with, or announced in its `error` heartbeat, with the failure's
    reason; None for other failures (a hang, a health verdict) and an error heartbeat without a code."""
    code = None
    if failure.kind is FailureKind.RANK_EXIT:
        code = next((r.returncode for r in exits if r.spec.rank == failure.rank), None)
    elif failure.kind is FailureKind.RANK_ERROR and failure.rank is not None:
        code = tracker.views[failure.rank].error_code
    return None if code is None else RankExit(int(code), failure.reason)


def hang_failure(
    ranks: Sequence[RankProcess],
    tracker: HeartbeatTracker,
    cfg: SupervisorConfig,
    node: int,
    now: float,
    *,
    heard_only: bool = False,
) -> Failure | None:
    """The live rank that holds the others up, when any is past its phase's (calibrated) timeout.
    `heard_only` (exit-only ranks): judge only ranks that have sent a heartbeat."""
    step_timeout, _ = timeouts.calibrated_step_timeout(list(tracker.step_times), cfg)
    ckpt_timeout, _ = timeouts.calibrated_checkpoint_timeout(list(tracker.ckpt_times), cfg)
    stale: dict[int, tuple[RankProcess, str]] = {}
    for r in ranks:
        if r.returncode is not None:
            continue
        view = tracker.views[r.spec.rank]
        if heard_only and view.last_heartbeat is None:
            continue
        limit = timeouts.phase_timeout(view.phase, step_timeout, cfg, ckpt_timeout, first_step=view.in_first_step)
        hung, reason = timeouts.is_hung(view.phase, view.last_progress, now, limit)
        if hung:
            stale[view.rank] = (r, reason)
    if not stale:
        return None
    views = tracker.views
    rank, blame = timeouts.blame_hang(
        [(rank, views[rank].step, views[rank].last_progress, process_state(r.pid)) for rank, (r, _) in stale.items()]
    )
    r, reason = stale[rank]
    return Failure(
        FailureKind.HANG,
        rank,
        node,
        tracker.current_step(),
        f"rank {rank} (pid {r.pid}): {reason}; {blame}",
        now - views[rank].last_progress,
    )


def process_state(pid: int) -> str:
    """psutil's process status ('stopped' for SIGSTOP), or 'gone'."""
    try:
        return psutil.Process(pid).status()
    except psutil.Error:
        return "gone"
