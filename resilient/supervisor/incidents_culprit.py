"""Which rank holds a hung job up, from every rank's process state, step and stack. Pure.

Peers of a stuck rank wait inside the collective it never reaches, so they go stale too; the
culprit is the rank that is not where the others are:
1. a stopped process (SIGSTOP, a debugger) cannot reach any collective;
2. else a rank outside any collective while others wait inside one;
3. else the lowest step (the rank that fell behind), then the lowest rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from resilient.supervisor.incidents_stacks import Frame, in_collective

STOPPED_STATES = ("stopped", "tracing-stop")


@dataclass(frozen=True)
class RankEvidence:
    rank: int
    process_state: str
    """psutil's status ('running', 'sleeping', 'stopped', ...) or 'gone'."""
    step: int | None
    stack: tuple[Frame, ...]
    """Main thread, innermost first; empty when no stack could be read."""


@dataclass(frozen=True)
class Culprit:
    rank: int | None
    frame: str | None
    """Its innermost frame, 'func (file:line)'."""
    reason: str


def _frame(e: RankEvidence) -> str | None:
    return str(e.stack[0]) if e.stack else None


def _behind(candidates: list[RankEvidence]) -> RankEvidence:
    return min(candidates, key=lambda e: (-1 if e.step is None else e.step, e.rank))


def find_culprit(evidence: list[RankEvidence]) -> Culprit:
    """The rank to blame and why (see the module docstring for the order of the rules)."""
    if not evidence:
        return Culprit(None, None, "no live rank to inspect")
    stopped = [e for e in evidence if e.process_state in STOPPED_STATES]
    if stopped:
        e = min(stopped, key=lambda e: e.rank)
        return Culprit(e.rank, _frame(e), f"rank {e.rank}'s process is {e.process_state} (SIGSTOP or a debugger)")
    read = [e for e in evidence if e.stack]
    waiting = [e for e in read if in_collective(e.stack)]
    outside = [e for e in read if not in_collective(e.stack)]
    if waiting and outside:
        e = _behind(outside)
        peers = ", ".join(str(w.rank) for w in sorted(waiting, key=lambda w: w.rank))
        return Culprit(
            e.rank, _frame(e), f"rank {e.rank} is outside any collective while rank(s) {peers} wait inside one"
        )
    e = _behind(evidence)
    return Culprit(
        e.rank, _frame(e), f"no rank stands apart by its stack; rank {e.rank} is at the lowest step ({e.step})"
    )
