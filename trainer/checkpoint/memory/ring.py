"""Who holds whose replica: the one ring definition of the memory tier.

Nodes form a ring in node-rank order; rank r's replica is kept by the rank with the same local rank on
the next node, (r + local_world) mod world, so node k keeps node k-1's replicas (as NVRx's local
checkpointing pairs ranks). A node that takes a lost node's place takes its node rank, and so its place
in the ring: the lost node's replicas are still held by the next node, and its own copies (gone with
its memory) are fetched from there at the restart (`choice.choose_tier`, `replication.transfer`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ring:
    """The replica ring of `world` ranks, `local_world` per node."""

    world: int
    local_world: int

    @property
    def nodes(self) -> int:
        return max(1, self.world // self.local_world)

    @property
    def replicated(self) -> bool:
        """One node has no other node to hold its replicas."""
        return self.nodes > 1

    def node_of(self, rank: int) -> int:
        return rank // self.local_world

    def holder_of(self, rank: int) -> int | None:
        """The rank that keeps `rank`'s replica (None: one node, no replica)."""
        return (rank + self.local_world) % self.world if self.replicated else None

    def replica_of(self, rank: int) -> int | None:
        """The rank whose replica `rank` keeps (None: one node)."""
        return (rank - self.local_world) % self.world if self.replicated else None

    def replica_node_of(self, node: int) -> int | None:
        """The node whose replicas node `node` keeps (None: one node)."""
        return (node - 1) % self.nodes if self.replicated else None

    def sends_first(self, rank: int) -> bool:
        """In the ring exchange, even nodes send first and odd ones receive first: no two ranks both
        block in send (gloo's send of a large message waits for the matching recv). A ring of odd
        length still makes progress: the last node's send pairs with node 0's receive, which node 0
        posts once its own send went through."""
        return self.node_of(rank) % 2 == 0
