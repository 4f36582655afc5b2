"""Open files inside a trusted directory without following links: every component below the directory
is opened relative to the handle of the one above it with O_NOFOLLOW, so a symbolic link planted in
place of a log, a config or a checkpoint file is refused (ELOOP) instead of being written through."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def open_dir(directory: Path | str) -> int:
    """A handle on `directory` (the path itself may pass through links its trusted parents hold)."""
    return os.open(directory, _DIR_FLAGS)


def open_at(dir_fd: int, names: tuple[str, ...], flags: int, mode: int = 0o600, *, make_dirs: bool = False) -> int:
    """Open `names` (one component each: subdirectories, then the file) below `dir_fd`, none of them a
    link; with `make_dirs`, missing subdirectories are created owner-only. Raises OSError (ELOOP for a link)."""
    fd = os.dup(dir_fd)
    try:
        for name in names[:-1]:
            _check_component(name)
            if make_dirs:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass
            child = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        _check_component(names[-1])
        # A reader never blocks on a FIFO planted in place of a file (regular files ignore O_NONBLOCK).
        nonblock = os.O_NONBLOCK if flags & os.O_ACCMODE == os.O_RDONLY else 0
        return os.open(names[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC | nonblock, mode, dir_fd=fd)
    finally:
        os.close(fd)


def open_beneath(directory: Path | str, *names: str, flags: int, mode: int = 0o600, make_dirs: bool = False) -> int:
    """`open_at` from a path: `open_beneath(run_dir, "logs", "x.log", flags=os.O_WRONLY | os.O_CREAT)`."""
    dir_fd = open_dir(directory)
    try:
        return open_at(dir_fd, names, flags, mode, make_dirs=make_dirs)
    finally:
        os.close(dir_fd)


def read_beneath(directory: Path | str, *names: str, limit: int | None = None) -> bytes:
    """The bytes of a regular file below `directory` (links refused; a FIFO or device is not read)."""
    fd = open_beneath(directory, *names, flags=os.O_RDONLY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", os.path.join(str(directory), *names))
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read() if limit is None else f.read(limit)
    finally:
        os.close(fd)


def _check_component(name: str) -> None:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"{name!r} is not one path component")
