"""Where the memory tier keeps everything (0700 directories, 0600 files):

    <root>/RUN                                the run that owns the root (files.claim_root)
    <root>/node<k>/own/step_<N>/rank<r>.bin, rank<r>.json, COMMITTED
    <root>/node<k>/replica/node<src>/step_<N>/rank<r>.bin, rank<r>.json, COMMITTED
    <root>/node<k>/.../.spare/rank<r>.bin     a pruned snapshot's file, reused by the next one

`root` is /dev/shm/resilient-<name> unless the config names one, the name derived from the run's secret
and its directory: no one else can predict it (and so create it first), and a new run, even in a
re-created run directory, never meets an old run's snapshots. Pure path arithmetic: which node's replica
a node keeps is the ring's business (ring.py), not this module's.
"""

from __future__ import annotations

from pathlib import Path

from resilient.core.secret import RunKey

COMMITTED = "COMMITTED"
"""A step directory's commit marker: without it the step does not exist for loading."""
SPARE = ".spare"
OWNER = "RUN"
"""The root's record of the run that owns it (JSON: run_id, run_dir)."""
SHM = Path("/dev/shm")
PREFIX = "resilient-"
"""Every default root is SHM/PREFIX<name>: what `resilient ckpt list` and `ckpt clean` look through."""


def default_root(run_dir: Path, key: RunKey) -> Path:
    """The tier's root for the run of `key` in `run_dir` when the config names none (shared by the nodes'
    subdirectories)."""
    name = key.mac("memory tier directory v1", str(Path(run_dir).resolve()).encode())[:20]
    return SHM / f"{PREFIX}{name}"


def node_dir(root: Path, node: int) -> Path:
    """Everything node `node` keeps (removed when the run finished)."""
    return root / f"node{node}"


def own_dir(root: Path, node: int) -> Path:
    return node_dir(root, node) / "own"


def replica_dir(root: Path, node: int, src_node: int) -> Path:
    """The replicas node `node` keeps for node `src_node`."""
    return node_dir(root, node) / "replica" / f"node{src_node}"


def step_dir(base: Path, step: int) -> Path:
    return base / f"step_{step:07d}"


def data_file(directory: Path, rank: int) -> Path:
    """Rank `rank`'s bytes in a step directory (or in a base's `.spare/`)."""
    return directory / f"rank{rank}.bin"


def meta_file(directory: Path, rank: int) -> Path:
    """Rank `rank`'s metadata in a step directory."""
    return directory / f"rank{rank}.json"


def spare_file(base: Path, rank: int) -> Path:
    return data_file(base / SPARE, rank)


def numbered(parent: Path, prefix: str) -> dict[int, Path]:
    """`<prefix><n>` entries of `parent` by n, ascending (none if `parent` is not a directory)."""
    found = {}
    if parent.is_dir():
        for path in parent.iterdir():
            tail = path.name[len(prefix) :]
            if path.name.startswith(prefix) and tail.isdigit():
                found[int(tail)] = path
    return dict(sorted(found.items()))


def steps_in(base: Path) -> dict[int, Path]:
    """step -> directory, committed or not."""
    return numbered(base, "step_")


def nodes_in(root: Path) -> dict[int, Path]:
    """node -> its directory under the tier's root."""
    return numbered(root, "node")


def replicas_in(node_path: Path) -> dict[int, Path]:
    """source node -> the directory of its replicas that a node's directory holds."""
    return numbered(node_path / "replica", "node")


def ranks_in(directory: Path) -> list[int]:
    """The ranks whose metadata a step directory holds."""
    return sorted(int(p.stem[4:]) for p in directory.glob("rank*.json") if p.stem[4:].isdigit())
