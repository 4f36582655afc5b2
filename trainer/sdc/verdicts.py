"""Silent-data-corruption decisions as pure functions of what the ranks gathered, each with its reason.

Ranks that must hold the same bits after the optimizer step share a *position* (the same tensor-,
pipeline-parallel place: the data- and context-parallel peers); ranks that compute one model replica's
forward share a *replica* (the same data-parallel index). A digest check votes within each position; a
re-execution compares each rank's per-step results (its replica's loss and gradient norm, and at a
check step its digest) with what the same rank computed the first time.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from resilient.core.exit_codes import ExitCode


@dataclass(frozen=True)
class ReplicaVerdict:
    """The outcome of one digest check."""

    agree: bool
    suspects: tuple[int, ...] = ()
    """Ranks outvoted by a strict majority of their position."""
    mismatched: tuple[int, ...] = ()
    """Positions whose ranks hold different digests."""
    unresolved: tuple[int, ...] = ()
    """Mismatched positions without a strict majority (two replicas, or a three-way split)."""
    reason: str = ""

    @property
    def needs_reexecution(self) -> bool:
        """A mismatch that the vote alone cannot attribute."""
        return not self.agree and bool(self.unresolved)


def judge_replicas(digests: Sequence[int], positions: Sequence[int]) -> ReplicaVerdict:
    """Do the ranks of every position hold one digest? A rank outvoted by a strict majority of its position
    is a suspect; a position without one (2 replicas, or no value held by more than half) is unresolved."""
    groups: dict[int, list[int]] = defaultdict(list)
    for rank, position in enumerate(positions):
        groups[position].append(rank)
    suspects, mismatched, unresolved, notes = [], [], [], []
    for position, ranks in sorted(groups.items()):
        counts = Counter(digests[r] for r in ranks)
        if len(counts) == 1:
            continue
        mismatched.append(position)
        value, votes = counts.most_common(1)[0]
        if votes * 2 > len(ranks):
            odd = [r for r in ranks if digests[r] != value]
            suspects += odd
            notes.append(
                f"position {position}: rank(s) {_ranks(odd)} differ from the {votes} of {len(ranks)} "
                "replicas that agree"
            )
        else:
            unresolved.append(position)
            notes.append(
                f"position {position}: {len(counts)} different digests over ranks {_ranks(ranks)}, no majority"
            )
    if not mismatched:
        return ReplicaVerdict(True, reason=f"{len(positions)} ranks agree in {len(groups)} position(s)")
    return ReplicaVerdict(False, tuple(sorted(suspects)), tuple(mismatched), tuple(unresolved), "; ".join(notes))


RESULTS = ("token losses", "gradient norm", "parameter digest")
"""What a step produces, in the order it is computed: the replica's own per-token losses (their bits, before
any collective of the step), the gradient norm (after the gradient reduction, which mixes every replica's
gradients into it), the parameter digest (after the update)."""
LOSS, GRAD_NORM, DIGEST = range(len(RESULTS))


def moment(step: int, result: int) -> int:
    """When `RESULTS[result]` of `step` was computed, as one comparable number."""
    return len(RESULTS) * step + result


def first_difference(step: int, first: Sequence[float], again: Sequence[float]) -> int | None:
    """The moment of the first of a step's results (token-loss bits, gradient norm) that did not reproduce
    bitwise (a NaN reproduces a NaN), or None."""
    for result, (a, b) in enumerate(zip(first, again, strict=True)):
        if not (a == b or (math.isnan(a) and math.isnan(b))):
            return moment(step, result)
    return None


@dataclass(frozen=True)
class Attribution:
    """The outcome of a re-execution."""

    suspects: tuple[int, ...]
    """Ranks whose own result did not reproduce first (empty: reproduced, or unattributable)."""
    first_step: int | None
    """The first step some rank did not reproduce (None: every result reproduced)."""
    reason: str

    @property
    def reproduced(self) -> bool:
        return self.first_step is None


def attribute(
    first: Sequence[int | None], replicas: Sequence[int], positions: Sequence[int], mismatched: Collection[int] = ()
) -> Attribution:
    """Who did not reproduce their own result first, from each rank's first differing `moment` (None: it
    reproduced everything). The replicas that differed first are suspect; with a digest mismatch, only
    their ranks at the mismatched positions (where the bits actually parted)."""
    moments = [m for m in first if m is not None]
    if not moments:
        return Attribution((), None, "every rank reproduced its own results")
    earliest = min(moments)
    step, what = divmod(earliest, len(RESULTS))
    bad = {replicas[r] for r, m in enumerate(first) if m == earliest}
    ranks = [r for r in range(len(first)) if replicas[r] in bad]
    narrowed = [r for r in ranks if positions[r] in set(mismatched)]
    suspects = tuple(narrowed or ranks)
    result = RESULTS[what]
    if len(bad) == len(set(replicas)) > 1:
        return Attribution(
            (),
            step,
            f"every replica's {result} at step {step} differs from its first run: "
            "a fault no replica can be blamed for alone",
        )
    return Attribution(
        suspects,
        step,
        f"rank(s) {_ranks(suspects)} did not reproduce their own {result} at step {step}; the other replicas did",
    )


def trusted_until(last_agreeing: int | None, first_bad_step: int | None) -> int | None:
    """The newest step whose state is known good: the last agreeing check, and before the first step a
    re-execution could not reproduce (a fault in the forward reaches every replica through the gradient
    reduction, so they agree on a state that is already wrong)."""
    if first_bad_step is None:
        return last_agreeing
    before = first_bad_step - 1
    return before if last_agreeing is None else min(last_agreeing, before)


def exit_code_for(rank: int, node: int, suspect_nodes: Collection[int], action: str) -> ExitCode | None:
    """How a rank leaves after a finding: the suspect nodes' ranks report it (UNHEALTHY_NODE removes the
    node, RANK_FAILED restarts every rank); with no suspect, rank 0 asks for a restart; None: wait for the
    supervisor to stop this rank (its node is fine, and a rank failing here must not be blamed)."""
    if not suspect_nodes:
        return ExitCode.RANK_FAILED if rank == 0 else None
    if node in suspect_nodes:
        return ExitCode.UNHEALTHY_NODE if action == "remove" else ExitCode.RANK_FAILED
    return None


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(map(str, ranks))


def differing_parameters(every: Sequence[tuple[int, Sequence[int], Sequence[str]]]) -> dict[int, list[str]]:
    """rank -> the parameters whose bit sums differ from the most common sums of its position, from each
    rank's (position, per-parameter sums, parameter names). Evidence only: with two replicas the lower
    rank's value counts as the common one."""
    groups: dict[int, list[int]] = defaultdict(list)
    for rank, (position, _, _) in enumerate(every):
        groups[position].append(rank)
    out: dict[int, list[str]] = {}
    for ranks in groups.values():
        for i, name in enumerate(every[ranks[0]][2]):
            values = Counter(every[r][1][i] for r in ranks)
            if len(values) == 1:
                continue
            common = values.most_common(1)[0][0]
            for r in ranks:
                if every[r][1][i] != common:
                    out.setdefault(r, []).append(name)
    return out
