"""Starting this node's ranks: each rank's identity (its `RankEnv`), handed to one of its parked spares where
one is alive (spares.py, a warm one first) and spawned cold otherwise, and the spares themselves: parked when
the supervisor starts, refilled once an attempt's new ranks step. All on the main thread: PR_SET_PDEATHSIG
in the ranks follows the thread that forked them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from resilient.rank.env import DEFAULT_STOP_SIGNALS, FailureHistory, RankEnv
from resilient.supervisor import spares
from resilient.supervisor.config import SupervisorConfig
from resilient.supervisor.ranks import RankProcess, spawn, stop_all
from resilient.supervisor.roster import Roster
from resilient.supervisor.topology import Topology


@dataclass(frozen=True)
class Launched:
    """An attempt's ranks on this node, as started."""

    ranks: list[RankProcess]
    spare_ranks: int
    """Ranks handed to a parked spare."""
    warm_ranks: int
    """Of those, ranks whose spare had finished its imports."""


class RankLauncher:
    """This node's rank starts, for every attempt of one supervisor."""

    def __init__(self, scfg: SupervisorConfig, topo: Topology, run_dir: Path, argv: list[str], socket: Path) -> None:
        self.scfg, self.topo, self.run_dir, self.argv, self.socket = scfg, topo, run_dir, argv, socket
        self.spares: spares.Spares | None = None
        """This node's parked spares; None when the rank command cannot be parked or spares are off."""

    def specs(
        self, plan: Roster, port: int, attempt: int, node: int, history: FailureHistory = FailureHistory()
    ) -> list[RankEnv]:
        """The identities of node rank `node`'s ranks in `plan`'s attempt `attempt`."""
        nproc = self.scfg.nproc_per_node
        return [
            RankEnv(
                rank=node * nproc + local,
                local_rank=local,
                world_size=len(plan.nodes) * nproc,
                local_world_size=nproc,
                node_rank=node,
                node_name=self.topo.node_name,
                master_addr=plan.host(plan.nodes[0]),
                master_port=port,
                attempt=attempt,
                run_dir=self.run_dir,
                heartbeat_socket=self.socket,
                supervisor_pid=os.getpid(),
                allow_shared_dir=self.scfg.allow_shared_dir,
                stop_signals=tuple(
                    dict.fromkeys((self.scfg.stop_signal().name, *DEFAULT_STOP_SIGNALS, self.scfg.preempt_signal))
                ),
                history=history,
            )
            for local in range(nproc)
        ]

    def spare_specs(self, plan: Roster, node: int | None) -> list[RankEnv]:
        """Spares carry their future rank's identity, with placeholders (attempt -1, port 0, no failure
        history) for what the assignment sets; a spare node's (`node` None) are node rank 0's."""
        return self.specs(plan, 0, -1, node or 0)

    def park(self, plan: Roster, node: int | None) -> None:
        """Park `spares_per_rank` processes per local rank, if the rank command can be parked (else say why not)."""
        if not self.scfg.warm_spares:
            return
        cmd, reason = spares.park_argv(self.argv, sys.executable, self.scfg.warm_imports)
        print(f"resilient: slot {self.topo.slot}: warm spares: {reason}", file=sys.stderr)
        if cmd is not None:
            self.spares = spares.Spares(
                cmd, self.run_dir, self.topo.slot, self.scfg.spares_per_rank, self.scfg.spare_refill_delay_s
            )
            self.spares.fill(self.spare_specs(plan, node))

    def launch(self, specs: Sequence[RankEnv], now: float) -> Launched:
        """Start `specs`' ranks, each on one of its spares where one is alive, else cold."""
        ranks: list[RankProcess] = []
        warm = parked = 0
        try:
            for spec in specs:
                taken = self.spares.take(spec, self.argv) if self.spares is not None else None
                warm += taken is not None and taken.warm
                parked += taken is not None
                ranks.append(taken.proc if taken is not None else spawn(spec, self.argv))
        except BaseException:  # e.g. a rank's log that cannot be opened safely: no rank of a partial start runs
            stop_all(ranks, 0.0)
            raise
        if self.spares is not None:
            self.spares.handed_out(now)
        return Launched(ranks, parked, warm)

    @property
    def refill_pending(self) -> bool:
        """Whether an attempt took spares that are not replaced yet."""
        return self.spares is not None and self.spares.refill_pending

    def refill_if_due(self, now: float, phases: list[str | None], plan: Roster, node: int | None) -> bool:
        """Replace the spares the last attempt took, once its ranks (their `phases`) step
        (`spares.refill_due`); whether it did."""
        if self.spares is None:
            return False
        return self.spares.refill_if_due(now, phases, lambda: self.spare_specs(plan, node))

    def close(self) -> None:
        """Kill every spare."""
        if self.spares is not None:
            self.spares.close()
