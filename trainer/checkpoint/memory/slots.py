"""The reserved, reused shared-memory files a rank's snapshots are copied into.

A fresh file costs ~3x the copy in page faults, so the loop should pay only the copy: retention
(retention.py) renames a pruned snapshot's file to `.spare/`, and the next snapshot takes it back,
written through the mapping it already has. Replicas are received the same way.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

from trainer.checkpoint.memory import naming

SLACK = 1 << 20
"""Files are sized up to a MiB multiple: the common-state blob's size varies a little from step to
step, and a spare file must still fit."""


def shm_file(path: Path, size: int) -> mmap.mmap:
    """A new owner-only file of `size` bytes, mapped. The blocks are reserved up front: a full tmpfs
    fails here with ENOSPC instead of killing the process with SIGBUS on the first write."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(size, 1))
        return mmap.mmap(fd, max(size, 1))
    finally:
        os.close(fd)


class Slots:
    """One rank's snapshot files in one base (its own, or the replicas it receives), kept mapped: the
    spare is renamed into the next snapshot's directory and written through its existing mapping.
    Anything missing or too small: a fresh file (correct, only slower). Mappings whose file is gone
    are closed."""

    def __init__(self, base: Path, rank: int) -> None:
        self.base, self.rank = base, rank
        self.spare = naming.spare_file(base, rank)
        self.maps: dict[int, mmap.mmap] = {}
        """inode -> the mapping of that file."""

    def take(self, path: Path, size: int) -> mmap.mmap:
        """A mapped owner-only file of at least `size` bytes at `path`."""
        try:
            st = self.spare.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and st.st_size >= size:
                buffer = self.maps.pop(st.st_ino, None)
                if buffer is None:  # left by an earlier process: its pages exist, map them
                    fd = os.open(self.spare, os.O_RDWR | os.O_NOFOLLOW)
                    try:
                        buffer = mmap.mmap(fd, st.st_size)
                    finally:
                        os.close(fd)
                os.replace(self.spare, path)  # ENOENT if prune removed it meanwhile: a fresh file then
                self.maps[st.st_ino] = buffer
                return buffer
        except OSError:
            pass
        buffer = shm_file(path, -(-size // SLACK) * SLACK)
        self.maps[path.stat().st_ino] = buffer
        return buffer

    def forget_gone(self) -> None:
        """Close the mappings of files no longer among this rank's snapshots or the spare."""
        alive = set()
        for path in [self.spare, *(naming.data_file(d, self.rank) for d in naming.steps_in(self.base).values())]:
            try:
                alive.add(path.lstat().st_ino)
            except OSError:
                pass
        for ino in [i for i in self.maps if i not in alive]:
            self.maps.pop(ino).close()

    def close(self) -> None:
        for buffer in self.maps.values():
            buffer.close()
        self.maps.clear()
