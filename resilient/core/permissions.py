"""Run and checkpoint directories must be this user's own: a directory another user owns or can write
lets that user plant checkpoints, configs or sockets. Refused with one line unless overridden."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from resilient.core.errors import ConfigError


def shared_problem(path: Path) -> str | None:
    """Why `path` (an existing directory) is not private to this user, or None. Missing paths are fine:
    they will be created owner-only; what cannot be a directory is reported by whoever creates it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    if st.st_uid != os.geteuid():
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def require_private(paths: list[Path], *, allowed: bool, flag: str) -> None:
    """ConfigError naming the first shared directory, unless the operator allowed shared directories."""
    if allowed:
        return
    for path in paths:
        problem = shared_problem(path)
        if problem:
            raise ConfigError(f"{problem}; refusing to use it (fix its owner/mode, or pass {flag})")
