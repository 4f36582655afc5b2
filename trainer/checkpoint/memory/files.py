"""The memory tier's file operations: its root's trust check and owner record, owner-only directories
and files (replaced atomically; tmpfs, so no fsync), and reads of a snapshot's bytes. No file is
opened through a link."""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path


def root_problem(root: Path) -> str | None:
    """Create the tier's root owner-only; why it cannot serve as one, or None: made by another user (in
    world-writable /dev/shm anyone can create a name first), a link, open to others, or unusable."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = root.lstat()
    except OSError as err:
        return f"memory tier {root}: {err.strerror or err}"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return f"memory tier {root}: not an owner-only directory of this user"
    return None


def claim_root(record: Path, run_id: str, run_dir: Path) -> str | None:
    """Record this run as the owner of the root `record` is in (naming.OWNER), or find it recorded; why the
    root belongs to another run, or None. A record naming another run dir with this run's id (a moved or
    copied run) is updated."""
    root = record.parent
    try:
        owner = json.loads(read_bytes(record))
    except FileNotFoundError:
        owner = None
    except (OSError, ValueError) as err:
        return f"memory tier {root}: unreadable owner record ({err})"
    if owner is not None and (not isinstance(owner, dict) or owner.get("run_id") != run_id):
        other = owner.get("run_id") if isinstance(owner, dict) else None
        return f"memory tier {root}: holds the snapshots of run {other!s:.40}, not of this run ({run_id})"
    if owner is None or owner.get("run_dir") != str(run_dir):
        write_private(record, json.dumps({"run_id": run_id, "run_dir": str(run_dir)}).encode())
    return None


def make_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def write_private(path: Path, data: bytes) -> None:
    """Owner-only, replaced atomically: a reader sees the old file or the whole new one. The temp name is
    the writer's own: the ranks of a node may write the same record at once (claiming their root)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor on the regular file at `path` (a link in its place: ELOOP; anything else: EINVAL)."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(22, "not a regular file", str(path))
    return fd


def read_bytes(path: Path) -> bytes:
    with os.fdopen(open_regular(path), "rb") as f:
        return f.read()


def read_prefix(path: Path, nbytes: int) -> bytearray:
    """The first `nbytes` of a file, read once into memory the loader can use as it is (owned and
    writable). Raises ValueError when the file is shorter, OSError when it cannot be read."""
    data = bytearray(nbytes)
    with os.fdopen(open_regular(path), "rb", buffering=0) as f:
        got = f.readinto(data) if nbytes else 0
    if got != nbytes:
        raise ValueError(f"size {got} < {nbytes}")
    return data
