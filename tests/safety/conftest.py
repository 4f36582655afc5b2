"""Real small filesystems for storage-fault tests (we run as root; skipped where mount is not allowed), and
an unprivileged attacker (uid 65534 through setpriv) with a directory both of us can reach."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

NOBODY = 65534
ATTACKER_PY = "/usr/bin/python3"
"""The attacker's interpreter: the system one (root's own is not reachable by uid 65534)."""


def as_nobody(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `argv` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *argv],
        check=check,
        capture_output=True,
        text=True,
        **kw,
    )


def nobody_popen(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", *argv], **kw)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A sticky world-writable directory under /tmp, as /tmp itself: others may add entries, not touch ours
    (pytest's own directories are root's alone, out of the attacker's reach)."""
    base = Path(tempfile.mkdtemp(prefix="resilient-trust-", dir="/tmp"))
    base.chmod(0o1777)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """mount(size) -> a fresh tmpfs of that size (e.g. "2m"), unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "fs") -> Path:
        mnt = tmp_path / name
        mnt.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mnt)], capture_output=True, text=True
        )
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
