"""Where checkpoints live and how the `latest` pointer is replaced atomically.

    checkpoints/step_0000100/      megatron torch_dist files + COMMITTED.json (the marker)
    checkpoints/latest             text file naming the step directory, replaced by rename
A directory without a valid marker does not exist for loading.
"""

from __future__ import annotations

import re
from pathlib import Path

from resilient.core import beneath
from resilient.core.atomic import atomic_write

MARKER = "COMMITTED.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def parse_step(name: str) -> int | None:
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def write_latest(root: Path, step: int) -> None:
    atomic_write(root / LATEST, f"{step_dir(root, step).name}\n".encode())


def read_latest(root: Path) -> int | None:
    """The step `latest` names, or None when absent or unreadable (a link in its place is not followed)."""
    try:
        return parse_step(beneath.read_beneath(root, LATEST, limit=256).decode().strip())
    except (OSError, UnicodeDecodeError):  # missing, a link, or not a file (a directory in its place)
        return None


def latest_problem(root: Path) -> str | None:
    """Why `latest` cannot be replaced by a rename (something other than a file is in its place)."""
    path = root / LATEST
    if path.exists() and not path.is_file():
        return f"{path} is not a file; the pointer cannot be replaced (remove it)"
    return None


def step_dirs(root: Path) -> dict[int, Path]:
    """Every step_* directory, committed or not, by step."""
    if not root.is_dir():
        return {}
    found = {}
    for child in root.iterdir():
        step = parse_step(child.name)
        if step is not None and child.is_dir():
            found[step] = child
    return dict(sorted(found.items()))


def committed_steps(root: Path) -> list[int]:
    """Steps whose directory carries the marker (validity is checked by verify)."""
    return [step for step, path in step_dirs(root).items() if (path / MARKER).is_file()]
