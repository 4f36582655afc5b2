"""What the memory tier holds: a rank's inventory at a restart, every step for `resilient ckpt list`, and
the stale roots of runs that are gone (`resilient ckpt list` reports them, `resilient ckpt clean` removes them)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from resilient.core import secret
from resilient.core.errors import ConfigError
from resilient.core.secret import RunKey
from trainer.checkpoint.memory import files, naming
from trainer.checkpoint.memory.choice import Inventory
from trainer.checkpoint.memory.ring import Ring
from trainer.checkpoint.memory.snapshot import SnapshotFormat


def inventory(root: Path, ring: Ring, rank: int, fmt: SnapshotFormat, checksums: bool = True) -> Inventory:
    """This rank's usable (committed, same layout; with `checksums`, verified) own copies and the
    replicas it holds for the rank the ring gives it."""
    own = {step: fmt.problem(path, rank, checksums)
           for step, path in naming.steps_in(naming.own_dir(root, ring.node_of(rank))).items()}
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
                rows.append({"tier": tier, "node": node, "of_node": src, "step": step, "ranks": ranks,
                             "state": state, "bytes": size, "problem": "; ".join(problems) or None,
                             "path": str(path)})
    return rows


def stale_reason(root: Path) -> str | None:
    """Why the default root `root` (this user's) is stale, or None while its run may still resume from it:
    its run directory is gone or holds another run now, or it predates the run records."""
    try:
        owner = json.loads(files.read_bytes(root / naming.OWNER))
        run_dir, run_id = Path(owner["run_dir"]), owner["run_id"]
    except FileNotFoundError:
        return "no run record (written before memory-tier directories were named from the run's secret)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable run record ({err})"
    try:
        found = secret.load(run_dir)
    except ConfigError as err:  # a secret that is not one: no run can resume from here
        return f"its run directory {run_dir} has no usable secret ({err})"
    if found is None:
        return f"its run directory {run_dir} is gone"
    key = RunKey(found)
    if key.run_id != run_id:
        return f"{run_dir} now holds another run ({key.run_id}, not {run_id})"
    if naming.default_root(run_dir, key) != root:
        return f"not the memory-tier directory of {run_dir} (the run moved)"
    return None


def stale_roots(shm: Path = naming.SHM) -> list[dict[str, Any]]:
    """The default roots in `shm` owned by this user whose run is gone: path, bytes, why."""
    rows = []
    try:
        entries = sorted(shm.iterdir())
    except OSError:
        return []
    for path in entries:
        try:
            st = path.lstat()
        except OSError:
            continue
        if not path.name.startswith(naming.PREFIX) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            continue
        why = stale_reason(path)
        if why is not None:
            size = sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())
            rows.append({"tier": "memory-stale", "step": None, "state": "stale", "bytes": size, "path": str(path),
                         "problem": why})
    return rows


def remove(root: Path) -> None:
    """Remove a stale root (after `stale_roots` named it)."""
    shutil.rmtree(root)
