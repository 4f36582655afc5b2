"""The store encoding of the typed coordination records: the only place they become (and stop being) JSON.

Values are sealed (auth.py), so only supervisors of this job wrote them; a shape this code does not
know is a bug, and raises.
"""

from __future__ import annotations

from typing import Any

from resilient.core.outcome import Outcome
from resilient.supervisor.decisions import AttemptDecision, NodeFault, NodeFaultKind
from resilient.supervisor.reports import NodeOutcome, NodeReport, RankExit, StopKind, StopRequest


def report_to_store(r: NodeReport) -> dict[str, Any]:
    final = r.final_rank_exit
    return {
        "node": r.node,
        "outcome": str(r.outcome),
        "start_step": r.start_step,
        "reached_step": r.reached_step,
        "unhealthy": r.unhealthy,
        "final_rank_exit": None if final is None else [final.code, final.reason],
        "slot": r.slot,
    }


def report_from_store(v: dict[str, Any]) -> NodeReport:
    final = v["final_rank_exit"]
    return NodeReport(
        node=int(v["node"]),
        outcome=NodeOutcome(v["outcome"]),
        start_step=v["start_step"],
        reached_step=v["reached_step"],
        unhealthy=v["unhealthy"],
        final_rank_exit=None if final is None else RankExit(int(final[0]), str(final[1])),
        slot=None if v.get("slot") is None else int(v["slot"]),
    )


def decision_to_store(d: AttemptDecision) -> dict[str, Any]:
    return {
        "outcome": None if d.outcome is None else str(d.outcome),
        "reason": d.reason,
        "backoff_s": d.backoff_s,
        "reached_step": d.reached_step,
        "no_progress_streak": d.no_progress_streak,
        "faulty_nodes": [[f.node, str(f.kind), f.reason] for f in d.faulty_nodes],
        "replace": d.replace,
        "final_step_uncommitted": d.final_step_uncommitted,
    }


def decision_from_store(v: dict[str, Any]) -> AttemptDecision:
    return AttemptDecision(
        outcome=None if v["outcome"] is None else Outcome(v["outcome"]),
        reason=v["reason"],
        backoff_s=float(v["backoff_s"]),
        reached_step=v["reached_step"],
        no_progress_streak=int(v["no_progress_streak"]),
        faulty_nodes=tuple(NodeFault(int(n), NodeFaultKind(kind), reason) for n, kind, reason in v["faulty_nodes"]),
        replace=bool(v["replace"]),
        final_step_uncommitted=bool(v["final_step_uncommitted"]),
    )


def stop_to_store(kind: StopKind, reason: str) -> dict[str, Any]:
    """A stop request's own fields; the coordinator adds its authenticated origin (node, pid, host)."""
    return {"kind": str(kind), "reason": reason}


def stop_from_store(v: dict[str, Any]) -> StopRequest:
    return StopRequest(
        kind=StopKind(v["kind"]), reason=v["reason"], node=int(v["node"]), pid=int(v["pid"]), host=v["host"]
    )
