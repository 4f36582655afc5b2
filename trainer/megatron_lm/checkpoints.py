"""Megatron-LM's save directory: list, verify and repair it, and find its newest complete iteration,
without torch or megatron (the supervisor and the read-only commands import this).

    SAVE_DIR/latest_checkpointed_iteration.txt   the tracker: an iteration number, or `release`
    SAVE_DIR/iter_0000100/                       one checkpoint per saved iteration, in any --ckpt-format
                                                 (trainer.megatron_lm.save_formats says when one is whole)
    SAVE_DIR/release/                            a release checkpoint, loaded when the tracker says `release`
    SAVE_DIR/non_persistent/                     --non-persistent-ckpt-type global: the same format with its
                                                 own tracker; Megatron-LM keeps only its newest iteration and
                                                 resumes from it when that is at least the persistent one

Each of the two tiers is checked against its own tracker; repair rewrites a tracker (atomically,
owner-only) and never deletes anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resilient.core.atomic import atomic_write
from resilient.core.errors import CheckpointError
from trainer.megatron_lm import save_formats

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
NON_PERSISTENT = "non_persistent"
PERSISTENT = "persistent"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_ITERATION = re.compile(r"^[0-9]+$")

Key = int | str
"""A checkpoint of a save directory: its iteration, or RELEASE."""


class TrackerError(ValueError):
    """The tracker exists but names nothing Megatron-LM can load (one line)."""


@dataclass(frozen=True)
class TierCheck:
    """What one tier's tracker names and the first problem with it (None: it names a whole checkpoint)."""

    tier: str
    tracked: Key | None
    problem: str | None


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def checkpoint_dir(root: Path, key: Key) -> Path:
    return root / RELEASE if key == RELEASE else iteration_dir(root, int(key))


def describe(key: Key) -> str:
    return "the release checkpoint" if key == RELEASE else f"iteration {key}"


def iterations(root: Path) -> dict[int, Path]:
    """Every iter_* directory, complete or not, by iteration."""
    if not root.is_dir():
        return {}
    found = {}
    for child in root.iterdir():
        match = _ITER_DIR.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def checkpoints(root: Path) -> dict[Key, Path]:
    """The release checkpoint (if any) first, then every iteration directory."""
    found: dict[Key, Path] = {RELEASE: root / RELEASE} if (root / RELEASE).is_dir() else {}
    found.update(iterations(root))
    return found


def read_tracker(root: Path) -> Key | None:
    """The iteration (or RELEASE) the tracker names; None when there is no tracker. TrackerError when it
    cannot be read or names neither, as Megatron-LM's read_metadata would refuse it."""
    path = root / TRACKER
    if not path.exists() and not path.is_symlink():
        return None
    try:
        text = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TrackerError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise TrackerError(f"{path}: unreadable ({err.strerror or err})") from None
    if text == RELEASE:
        return RELEASE
    if not _ITERATION.match(text):
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise TrackerError(f"{path}: names neither an iteration nor `release` ({shown!r})")
    return int(text)


def write_tracker(root: Path, key: Key) -> None:
    """Replace the tracker atomically, owner-only (Megatron-LM writes the bare number or `release`)."""
    path = root / TRACKER
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; repair deletes nothing: move it aside")
    try:
        atomic_write(path, str(key))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot write ({err.strerror or err})") from None


def tiers(root: Path) -> list[tuple[str, Path]]:
    """The tiers `root` holds: itself (persistent) and non_persistent/, each when it has a tracker or a
    checkpoint directory."""
    found = []
    for tier, path in ((PERSISTENT, root), (NON_PERSISTENT, root / NON_PERSISTENT)):
        tracker = path / TRACKER
        if tracker.exists() or tracker.is_symlink() or checkpoints(path):
            found.append((tier, path))
    return found


def holds_checkpoints(root: Path) -> bool:
    """Whether `root` looks like a Megatron-LM save directory."""
    return bool(tiers(root))


def check(ckpt_dir: Path, *, checksums: bool = False) -> str | None:
    """None if the checkpoint directory is whole (structure and sizes; with `checksums` its recorded
    digests too), else the first problem found."""
    return save_formats.check(ckpt_dir, checksums=checksums)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _tracked_or_none(root: Path) -> Key | None:
    try:
        return read_tracker(root)
    except TrackerError:
        return None


def listing(root: Path) -> list[dict[str, Any]]:
    """Every checkpoint of both tiers with its state (complete / incomplete: problem), format, bytes and
    whether its tier's tracker names it."""
    rows = []
    for tier, path in tiers(root):
        tracked = _tracked_or_none(path)
        for key, ckpt in checkpoints(path).items():
            problem = check(ckpt)
            rows.append(
                {
                    "step": key,
                    "tier": tier,
                    "format": save_formats.save_format(ckpt),
                    "state": "complete" if problem is None else "incomplete",
                    "problem": problem,
                    "bytes": _bytes(ckpt),
                    "latest": key == tracked,
                    "path": str(ckpt),
                }
            )
    return rows


def newest_complete(root: Path) -> int | None:
    """The newest complete iteration of either tier (a release checkpoint is no training progress);
    an unreadable save directory holds none."""
    try:
        found = [_newest_complete_iteration(path) for _, path in tiers(root)]
    except OSError:
        return None
    return max((it for it in found if it is not None), default=None)


def _newest_complete_iteration(path: Path) -> int | None:
    return next((it for it, ckpt in reversed(iterations(path).items()) if check(ckpt) is None), None)


def tracker_problem(root: Path, *, checksums: bool = False) -> str | None:
    """None when the tracker of this tier names a whole checkpoint, else what is wrong with it."""
    try:
        tracked = read_tracker(root)
    except TrackerError as err:
        return str(err)
    if tracked is None:
        return f"{TRACKER} is missing"
    ckpt = checkpoint_dir(root, tracked)
    if not ckpt.is_dir():
        return f"{TRACKER} names {describe(tracked)}, which has no directory"
    problem = check(ckpt, checksums=checksums)
    return None if problem is None else f"{TRACKER} names {describe(tracked)}, which is incomplete: {problem}"


def verify(root: Path, *, checksums: bool = True) -> list[TierCheck]:
    """Each tier's tracker against the checkpoint it names."""
    return [
        TierCheck(tier, _tracked_or_none(path), tracker_problem(path, checksums=checksums))
        for tier, path in tiers(root)
    ]


def resumes_from(root: Path) -> tuple[str, Key] | None:
    """The tier and checkpoint Megatron-LM's load would pick: the non-persistent tracker's iteration when
    it is at least the persistent one's (a release counts as iteration 0), else the persistent tracker's."""
    named = {tier: _tracked_or_none(path) for tier, path in tiers(root)}
    persistent, non_persistent = named.get(PERSISTENT), named.get(NON_PERSISTENT)
    as_iteration = -1 if persistent is None else 0 if persistent == RELEASE else int(persistent)
    if isinstance(non_persistent, int) and non_persistent >= as_iteration:
        return NON_PERSISTENT, non_persistent
    return None if persistent is None else (PERSISTENT, persistent)


def repair(root: Path) -> list[tuple[str, Key | None, Key | None, str]]:
    """Per tier: point a tracker that names nothing whole at the newest complete iteration of its tier
    (never at a release checkpoint: that would restart training from it); a tracker naming a whole
    checkpoint is left alone (an operator may have rolled back on purpose). Checks structure and sizes,
    as `listing` does. Returns (tier, before, after, what happened); `after` is None when nothing could
    be pointed at."""
    done = []
    for tier, path in tiers(root):
        before = _tracked_or_none(path)
        problem = tracker_problem(path)
        if problem is None:
            done.append((tier, before, before, f"tracker already names complete {describe(before)}"))
            continue
        target = _newest_complete_iteration(path)
        if target is None:
            hint = (
                " (Megatron-LM resumes from it while it is at least the persistent iteration: move it aside)"
                if tier == NON_PERSISTENT
                else ""
            )
            done.append((tier, before, None, f"{problem}; no complete iteration to point it at{hint}"))
            continue
        write_tracker(path, target)
        done.append((tier, before, target, f"{problem}; tracker now names iteration {target}"))
    return done
