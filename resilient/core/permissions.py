"""Run, checkpoint and memory directories must be this user's own, and so must the whole path to them:
whoever can rename an ancestor can swap the directory for one of their own and plant checkpoints,
configs or links in it. Refused with one line unless the operator overrides it; a directory that
vanishes or is replaced while a run uses it is reported as such (a storage fault).

Every ancestor, from /, must be owned by root or this user and writable by no one else, unless it is
sticky (like /tmp or /dev/shm: others may add entries but not rename ours). The directory itself must
be owned by this user and writable by no one else. A symbolic link on the way must be owned by root or
this user, and its target is checked the same way. Missing components are fine: they are created
owner-only by whoever needs them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from resilient.core.errors import ConfigError

_MAX_LINKS = 40


def judge_dir(path: Path, st: os.stat_result, euid: int, *, leaf: bool) -> str | None:
    """Why the directory `path` with status `st` is not trustworthy for this user, or None. `leaf`: the
    directory the run uses itself (must be this user's own); else one of its ancestors."""
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if leaf:
        if st.st_uid != euid:
            return f"{path} is owned by uid {st.st_uid}, not by this user (uid {euid})"
        if writable:
            return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
        return None
    if st.st_uid not in (0, euid):
        return f"{path}, a parent directory, is owned by uid {st.st_uid} (neither root nor this user, uid {euid})"
    if writable and not st.st_mode & stat.S_ISVTX:
        return (
            f"{path}, a parent directory, is writable by other users and not sticky "
            f"(mode {stat.S_IMODE(st.st_mode):04o})"
        )
    return None


def path_problem(path: Path, *, euid: int | None = None, _links: int = 0) -> str | None:
    """Why the path to directory `path` (every ancestor, `path` itself) is not this user's alone, or None."""
    euid = os.geteuid() if euid is None else euid
    target = Path(os.path.abspath(path))
    current = Path("/")
    try:
        problem = judge_dir(current, os.lstat(current), euid, leaf=target == current)
    except OSError as err:
        return f"{current}: cannot inspect ({err.strerror})"
    for index, part in enumerate(target.parts[1:], start=1):
        if problem:
            return problem
        nxt = current / part
        leaf = index == len(target.parts) - 1
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            return None  # created owner-only from here down
        except OSError as err:
            return f"{nxt}: cannot inspect ({err.strerror})"
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in (0, euid):
                return f"{nxt} is a symbolic link owned by uid {st.st_uid} (neither root nor this user)"
            if _links >= _MAX_LINKS:
                return f"{nxt}: too many levels of symbolic links"
            resolved = Path(os.path.realpath(nxt))
            rest = Path(resolved, *target.parts[index + 1 :])
            return path_problem(rest, euid=euid, _links=_links + 1)
        if not stat.S_ISDIR(st.st_mode):
            return None  # not a directory: whoever creates the path reports it
        problem = judge_dir(nxt, st, euid, leaf=leaf)
        current = nxt
    return problem


def require_private(paths: list[Path], *, allowed: bool, flag: str) -> None:
    """ConfigError naming the first directory whose path is not private, unless the operator allowed
    shared directories."""
    if allowed:
        return
    for path in paths:
        problem = path_problem(path)
        if problem:
            raise ConfigError(f"{problem}; refusing to use {path} (fix its owner/mode, or pass {flag})")


@dataclass(frozen=True)
class DirId:
    """Which directory a path named when it was checked (device, inode)."""

    dev: int
    ino: int

    @classmethod
    def of(cls, path: Path) -> DirId | None:
        """The directory at `path` now (None: missing or not a directory)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None

    @classmethod
    def of_fd(cls, fd: int) -> DirId:
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino)


def identity_problem(path: Path, expected: DirId, now: DirId | None) -> str | None:
    """Why `path` is no longer the directory the run started with (`now`: `DirId.of(path)`), or None."""
    if now is None:
        return f"{path} vanished while the run was using it"
    if now != expected:
        return f"{path} was replaced by another directory while the run was using it (refusing to use it)"
    return None


def changed_dirs(expected: dict[Path, DirId]) -> tuple[Path, str] | None:
    """The first of the run's directories that vanished or was replaced since `expected` was taken, and how."""
    for path, was in expected.items():
        problem = identity_problem(path, was, DirId.of(path))
        if problem:
            return path, problem
    return None


def capture(paths: list[Path]) -> dict[Path, DirId]:
    """The identity of each existing directory in `paths`."""
    return {p: dir_id for p in paths if (dir_id := DirId.of(p)) is not None}
