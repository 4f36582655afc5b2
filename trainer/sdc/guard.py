"""A rank's silent-data-corruption guard: replica checks, the results a re-execution compares, findings.

Every method that gathers is called by all ranks at the same step boundary. The guard keeps, for the
steps since the last trusted checkpoint, what this rank computed (its replica's loss and gradient norm
per step, its digest at check steps); a re-execution replays those steps from trusted state and
compares. Decisions are the pure functions of `verdicts`; the evidence (ledger, incident) is written
by rank 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from resilient.core import ledger
from resilient.core.errors import ResilientError
from resilient.core.events import LedgerEvent
from resilient.core.exit_codes import ExitCode
from trainer.model import params_gathered
from trainer.sdc import digest, incident, verdicts
from trainer.sdc.config import NumericsConfig
from trainer.sdc.replicas import Topology, gather_int

log = logging.getLogger(__name__)

MISMATCH = "mismatch"
"""The kind of a suspicion raised by a replica check (the others are numerics' verdict kinds)."""
KEEP_RESULTS = 100_000
"""Per-step results kept for re-executions (older ones are dropped first)."""


class SilentDataCorruption(ResilientError):
    """This rank leaves after a finding: its node is the suspect (or no node could be named)."""

    label = "silent data corruption"

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Check:
    step: int
    digest: int
    """This rank's digest."""
    digests: tuple[int, ...]
    verdict: verdicts.ReplicaVerdict
    seconds: float
    differing: dict[int, list[str]] = field(default_factory=dict)
    """On a mismatch: rank -> parameters whose bits differ from the most common value of its position."""


@dataclass
class Suspicion:
    """A step under re-execution."""

    step: int
    kind: str
    reason: str
    original: dict[int, tuple[int, float]]
    """This rank's results of the first execution, by step."""
    check: Check | None = None
    """The mismatching check (kind `mismatch`)."""
    from_step: int | None = None
    """The trusted step the re-execution started from."""
    first: int | None = None
    """This rank's first result that did not reproduce (a `verdicts.moment`)."""


@dataclass(frozen=True)
class Finding:
    """Silent data corruption found: what, where, by which evidence, and how far back state is trusted."""

    step: int
    kind: str
    how: str
    """"majority vote" or "re-execution"."""
    suspects: tuple[int, ...]
    trusted_until: int | None
    reason: str
    check: Check | None = None
    reexecution: dict[str, Any] | None = None


class SdcGuard:
    def __init__(
        self,
        cfg: NumericsConfig,
        chunks: Sequence[torch.nn.Module],
        topology: Topology,
        *,
        device: torch.device,
        run_dir: Path,
        attempt: int,
    ) -> None:
        self.cfg, self.chunks, self.topology, self.device = cfg, chunks, topology, device
        self.run_dir, self.attempt = run_dir, attempt
        self.rank = dist.get_rank()
        self.last_agreeing: int | None = None
        """The last step whose replica check agreed."""
        self.results: dict[int, tuple[int, float]] = {}
        self.suspicion: Suspicion | None = None

    # -- checks -----------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        every = self.cfg.replica_check_interval_steps
        return bool(every) and step % every == 0

    def check(self, step: int) -> Check:
        """Digest this rank's parameters, gather every rank's digest and vote (all ranks)."""
        started = time.perf_counter()
        with params_gathered(self.chunks):
            sums = digest.parameter_sums(self.chunks)
        mine = digest.fold(sums)
        digests = tuple(gather_int(mine, self.device))
        verdict = verdicts.judge_replicas(digests, self.topology.positions)
        differing = {} if verdict.agree else self._differing(sums)
        check = Check(step, mine, digests, verdict, time.perf_counter() - started, differing)
        if verdict.agree:
            self.last_agreeing = step
        return check

    def _differing(self, sums: torch.Tensor) -> dict[int, list[str]]:
        """Which parameters differ, per rank, from the most common bits of its position (evidence only):
        the per-parameter sums are compared within each position's group, and only the names of the
        parameters that differ travel to every rank."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        peers: list[list[int]] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
        dist.all_gather_object(peers, sums.tolist(), group=group)
        names = digest.parameter_names(self.chunks)
        position = self.topology.positions[self.rank]
        local = verdicts.differing_parameters([(position, peer, names) for peer in peers])
        mine = local.get(dist.get_group_rank(group, self.rank), [])
        every: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(every, mine)
        return {rank: found for rank, found in enumerate(every) if found}

    # -- results and re-execution -----------------------------------------------------------------

    @property
    def reexecuting(self) -> bool:
        return self.suspicion is not None and self.suspicion.from_step is not None

    def record(self, step: int, loss_bits: int, grad_norm: float) -> None:
        """This rank's result of `step` (its replica's per-token loss bits and the gradient norm); during a
        re-execution, compared with the first execution's first."""
        s = self.suspicion
        if s is not None and s.from_step is not None and step in s.original and s.first is None:
            s.first = verdicts.first_difference(step, s.original[step], (loss_bits, grad_norm))
        self.results[step] = (loss_bits, grad_norm)
        if len(self.results) > KEEP_RESULTS:  # steps are recorded in order: the first key is the oldest
            del self.results[next(iter(self.results))]

    def suspect(self, step: int, kind: str, reason: str, check: Check | None = None) -> Suspicion:
        """Hold `step` under suspicion: the results so far are what a re-execution compares with."""
        self.suspicion = Suspicion(step, kind, reason, dict(self.results), check)
        return self.suspicion

    def reexecute_from(self, step: int) -> None:
        """The re-execution starts: `step` (trusted) was loaded; the steps after it run again."""
        assert self.suspicion is not None
        self.suspicion.from_step = step
        self.results = {s: r for s, r in self.results.items() if s <= step}
        if self.rank == 0:
            ledger.append(
                self.run_dir,
                LedgerEvent.SDC_SUSPECTED,
                step=self.suspicion.step,
                kind=self.suspicion.kind,
                reason=self.suspicion.reason,
                reexecute_from=step,
                attempt=self.attempt,
            )
        log.warning("step %d: %s; re-executing from step %d", self.suspicion.step, self.suspicion.reason, step)

    def conclude(self) -> tuple[Suspicion, verdicts.Attribution, Check | None]:
        """At the suspicious step of the re-execution (all ranks): who did not reproduce their own
        results. A mismatch is checked again, so each rank also compares its own digest."""
        s = self.suspicion
        assert s is not None and s.from_step is not None
        again = None
        if s.check is not None:
            again = self.check(s.step)
            if s.first is None and again.digest != s.check.digest:
                s.first = verdicts.moment(s.step, verdicts.DIGEST)
        firsts = gather_int(-1 if s.first is None else s.first, self.device)
        mismatched = s.check.verdict.mismatched if s.check is not None else ()
        attribution = verdicts.attribute(
            [None if m < 0 else m for m in firsts], self.topology.replicas, self.topology.positions, mismatched
        )
        self.suspicion = None
        return s, attribution, again

    # -- findings ---------------------------------------------------------------------------------

    def by_vote(self, check: Check, trusted_until: int | None) -> Finding:
        return Finding(
            check.step, MISMATCH, "majority vote", check.verdict.suspects, trusted_until, check.verdict.reason, check
        )

    def unattributed(self, check: Check, trusted_until: int | None, why: str) -> Finding:
        """A mismatch no re-execution can attribute: the run restarts from trusted state, no node blamed."""
        return Finding(
            check.step, MISMATCH, "replica check", (), trusted_until, f"{check.verdict.reason}; {why}", check
        )

    def by_reexecution(self, s: Suspicion, attribution: verdicts.Attribution, again: Check | None) -> Finding:
        details = {
            "from_step": s.from_step,
            "first_unreproduced_step": attribution.first_step,
            "outcome": attribution.reason,
            "replicas_agree_after": None if again is None else again.verdict.agree,
        }
        return Finding(
            s.step,
            s.kind,
            "re-execution",
            attribution.suspects,
            verdicts.trusted_until(self.last_agreeing, attribution.first_step),
            f"{s.reason}; {attribution.reason}",
            s.check,
            details,
        )

    def report(self, finding: Finding, *, action: str, withdrawn: dict[str, list[int]]) -> None:
        """All ranks: rank 0 writes the incident directory and the ledger record (sdc_confirmed when a rank
        is named, else sdc_suspected: the run restarts from trusted state without blaming a node); no rank
        returns before it is written, since a suspect's exit makes the supervisor stop every rank."""
        if self.rank == 0:
            self._record(finding, action=action, withdrawn=withdrawn)
        dist.barrier()

    def _record(self, finding: Finding, *, action: str, withdrawn: dict[str, list[int]]) -> None:
        topo = self.topology
        nodes = topo.nodes_of(finding.suspects)
        fields = {
            "step": finding.step,
            "kind": finding.kind,
            "how": finding.how,
            "ranks": list(finding.suspects),
            "nodes": [topo.node_names[topo.nodes.index(n)] for n in nodes],
            "trusted_until": finding.trusted_until,
            "reason": finding.reason[:1000],
            "attempt": self.attempt,
            "action": action if finding.suspects else "restart",
            "withdrawn": withdrawn,
        }
        fields["incident"] = incident.write(
            self.run_dir, self.attempt, fields, finding.check, finding.reexecution, topo
        )
        event = LedgerEvent.SDC_CONFIRMED if finding.suspects else LedgerEvent.SDC_SUSPECTED
        ledger.append(self.run_dir, event, **fields)
