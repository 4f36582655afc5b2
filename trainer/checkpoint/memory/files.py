"""The memory tier's file operations: its root's trust check, owner-only directories and files
(replaced atomically; tmpfs, so no fsync), and reads of a snapshot's bytes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from resilient.core.errors import CheckpointError


def check_root(root: Path) -> None:
    """Create the tier's root owner-only; refuse one (in world-writable /dev/shm) that another user
    made, that is a link, or that others can open."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.lstat()
    except OSError as err:
        raise CheckpointError(f"memory tier {root}: {err}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise CheckpointError(f"memory tier {root}: not an owner-only directory of this user; refusing it")


def make_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private(path: Path, data: bytes) -> None:
    """Owner-only, replaced atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_prefix(path: Path, nbytes: int) -> bytearray:
    """The first `nbytes` of a file, read once into memory the loader can use as it is (owned and
    writable). Raises ValueError when the file is shorter, OSError when it cannot be read."""
    data = bytearray(nbytes)
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(data) if nbytes else 0
    if got != nbytes:
        raise ValueError(f"size {got} < {nbytes}")
    return data
