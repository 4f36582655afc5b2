"""What the memory tier holds: a rank's inventory at a restart, and every step for `resilient ckpt list`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resilient.core.secret import RunKey
from trainer.checkpoint.memory import naming
from trainer.checkpoint.memory.choice import Inventory
from trainer.checkpoint.memory.ring import Ring
from trainer.checkpoint.memory.snapshot import SnapshotFormat


def inventory(root: Path, ring: Ring, rank: int, fmt: SnapshotFormat, checksums: bool = True) -> Inventory:
    """This rank's usable (committed, same layout; with `checksums`, verified) own copies and the
    replicas it holds for the rank the ring gives it."""
    own = {
        step: fmt.problem(path, rank, checksums)
        for step, path in naming.steps_in(naming.own_dir(root, ring.node_of(rank))).items()
    }
    src = ring.replica_of(rank)
    if src is None:
        return Inventory(own)
    held = naming.steps_in(naming.replica_dir(root, ring.node_of(rank), ring.node_of(src)))
    return Inventory(own, src, {step: fmt.problem(path, src, checksums) for step, path in held.items()})


def listing(root: Path, key: RunKey | None = None) -> list[dict[str, Any]]:
    """Every step directory under `root`: tier, node, step, ranks, state (checksums verified; with the
    run's `key`, seals too: another run's copy is "damaged")."""
    fmt = SnapshotFormat(key)  # any layout
    rows = []
    for node, node_path in naming.nodes_in(root).items():
        bases = [("memory-own", None, node_path / "own")]
        bases += [("memory-replica", src, path) for src, path in naming.replicas_in(node_path).items()]
        for tier, src, base in bases:
            for step, path in naming.steps_in(base).items():
                ranks = naming.ranks_in(path)
                problems = [f"rank {r}: {p}" for r in ranks if (p := fmt.problem(path, r))]
                committed = (path / naming.COMMITTED).exists()
                state = "complete" if committed and not problems else ("damaged" if committed else "incomplete")
                size = sum(p.stat().st_size for p in path.glob("rank*.bin"))
                rows.append(
                    {
                        "tier": tier,
                        "node": node,
                        "of_node": src,
                        "step": step,
                        "ranks": ranks,
                        "state": state,
                        "bytes": size,
                        "problem": "; ".join(problems) or None,
                        "path": str(path),
                    }
                )
    return rows
