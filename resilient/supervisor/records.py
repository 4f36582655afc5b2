"""The coordinator's ledger records of the run: its decisions, the nodes it takes out, a lost coordinator,
an election won, a fence; and any slot's complaints about the coordination store.

Side effects only (appends to RUN_DIR/ledger.jsonl): what goes in each record is decided elsewhere
(decisions.py, election.py); these functions say it the same way wherever it is decided.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from resilient.core import ledger
from resilient.core.events import LedgerEvent
from resilient.core.outcome import Outcome
from resilient.supervisor.decisions import AttemptDecision
from resilient.supervisor.reports import StopRequest
from resilient.supervisor.roster import Roster


def decision(
    run_dir: Path,
    d: AttemptDecision,
    *,
    attempt: int,
    failure: dict[str, Any] | None,
    stop: StopRequest | None,
    plan: Roster,
    roster: Roster,
    slot: int,
) -> None:
    """Attempt `attempt`'s decision: RESTART (with the failure that caused it), FINISHED, PREEMPTED (who asked)
    or GAVE_UP (naming the unhealthy node `slurm on-exit` excludes)."""
    epoch = roster.epoch
    if d.restart:
        ledger.append(
            run_dir,
            LedgerEvent.RESTART,
            attempt=attempt + 1,
            backoff_seconds=d.backoff_s,
            reason=f"{failure['reason'] if failure else 'restart'}; {d.reason}",
            origin=None if failure is None else {k: failure.get(k) for k in ("node", "host", "pid")},
            epoch=epoch,
        )
    elif d.outcome is Outcome.FINISHED:
        ledger.append(run_dir, LedgerEvent.FINISHED, step=d.reached_step, epoch=epoch)
    elif d.outcome is Outcome.PREEMPTED:
        ledger.append(
            run_dir,
            LedgerEvent.PREEMPTED,
            step=d.reached_step,
            node=stop.node if stop else slot,
            origin=None if stop is None else {"node": stop.node, "host": stop.host, "pid": stop.pid},
            reason=stop.reason if stop else None,
            epoch=epoch,
        )
    else:
        assert d.exit_code is not None  # every stop but FINISHED and PREEMPTED names its exit code
        ledger.append(
            run_dir,
            LedgerEvent.GAVE_UP,
            reason=d.reason,
            exit_code=int(d.exit_code),
            epoch=epoch,
            node=condemned_host(d, plan, roster),
        )


def condemned_host(d: AttemptDecision, plan: Roster, roster: Roster) -> str | None:
    """The name of the first unhealthy node a stop decision names (what `slurm on-exit` excludes): its slot
    from the attempt's plan, its name from the newest roster (names come with the leases)."""
    for f in d.faulty_nodes:
        if str(f.kind) == "unhealthy" and f.node < len(plan.nodes):
            return roster.name(plan.nodes[f.node])
    return None


def bad_node(
    run_dir: Path,
    roster: Roster,
    slot: int,
    *,
    node_rank: int | None,
    kind: str,
    reason: str,
    attempt: int,
    replaced_by: int | None = None,
) -> None:
    """The run's bad-node ledger: one record per node taken out (`node_rank` None: a spare)."""
    ledger.append(
        run_dir,
        LedgerEvent.BAD_NODE,
        node=roster.name(slot),
        slot=slot,
        epoch=roster.epoch,
        attempt=attempt,
        node_rank=node_rank,
        kind=kind,
        reason=reason,
        replaced_by=None if replaced_by is None else roster.name(replaced_by),
    )


def coordinator_lost(run_dir: Path, slot: int, attempt: int, reason: str, *, minority: bool) -> None:
    ledger.append(run_dir, LedgerEvent.COORDINATOR_LOST, node=slot, attempt=attempt, reason=reason, minority=minority)


def elected(run_dir: Path, host: str, slot: int, epoch: int, lost: int, attempt: int) -> None:
    """Slot `slot` won the election of `epoch` after coordinator slot `lost` was lost."""
    ledger.append(run_dir, LedgerEvent.ELECTED, node=host, slot=slot, epoch=epoch, lost=lost, attempt=attempt)


def fenced(run_dir: Path, roster: Roster, slot: int, pid: int | None, ok: bool, detail: str) -> None:
    ledger.append(run_dir, LedgerEvent.FENCE, node=roster.name(slot), slot=slot, pid=pid, ok=ok, detail=detail)


class StoreComplaints:
    """What slot `slot` says when the coordination store misbehaves (the callbacks of its `Access`)."""

    def __init__(self, run_dir: Path, slot: int) -> None:
        self.run_dir, self.slot = run_dir, slot
        self._forged_keys: set[str] = set()

    def forged(self, key: str, reason: str) -> None:
        """A store value that fails authentication: ignored, and recorded once per key."""
        if key not in self._forged_keys:
            self._forged_keys.add(key)
            ledger.append(self.run_dir, LedgerEvent.AUTH_REJECTED, node=self.slot, key=key, reason=reason)
            print(f"resilient: slot {self.slot}: rejected coordination value: {reason}", file=sys.stderr)

    def limit(self, why: str) -> None:
        """The hosted store refused a write at a bound (keys, bytes, connections)."""
        print(f"resilient: slot {self.slot}: coordination store: {why}", file=sys.stderr, flush=True)
