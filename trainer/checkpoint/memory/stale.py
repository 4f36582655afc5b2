"""Memory-tier roots of runs that are gone: `resilient ckpt list` reports them, `resilient ckpt clean`
removes them. A default root records the run that owns it (naming.OWNER); it is stale once that run's
directory is gone, holds another run (re-created: a new secret), or names another root (the run moved),
or when it predates run records. Reads no snapshot (no torch): the commands answer at once."""

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
            rows.append(
                {
                    "tier": "memory-stale",
                    "step": None,
                    "state": "stale",
                    "bytes": size,
                    "path": str(path),
                    "problem": why,
                }
            )
    return rows


def remove(root: Path) -> None:
    """Remove a stale root (after `stale_roots` named it)."""
    shutil.rmtree(root)
