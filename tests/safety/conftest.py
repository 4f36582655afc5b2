"""Real small filesystems for storage-fault tests (we run as root; skipped where mount is not allowed)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """mount(size) -> a fresh tmpfs of that size (e.g. "2m"), unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "fs") -> Path:
        mnt = tmp_path / name
        mnt.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.fail(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file until the filesystem has at most `leave_bytes` free (ENOSPC ends the fill)."""
    import os
    import shutil

    path = directory / "filler"
    with open(path, "wb") as f:
        try:
            while (free := shutil.disk_usage(directory).free) > leave_bytes:
                f.write(b"\0" * min(free - leave_bytes, 1 << 20) or b"\0")
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            pass
    return path
