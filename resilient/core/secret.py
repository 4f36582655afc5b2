"""The run's secret: RUN_DIR/.secret, 0600, created by whichever supervisor comes first; every key that
proves membership of the run (coordination store, sealed values, the ranks' rendezvous) is derived from it
for one purpose, never the file's bytes themselves."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from resilient.core.errors import ConfigError

SECRET_NAME = ".secret"
_SECRET_BYTES = 32


def _check_owner_only(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: not a regular file; the run secret must be one (remove it to make a new one)")
    if st.st_uid != os.geteuid():
        raise ConfigError(f"{path}: owned by uid {st.st_uid}, not by this user; refusing the run secret")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; "
                          f"the run secret must be 0600 (chmod 600 {path})")


def load_or_create_secret(run_dir: Path) -> bytes:
    """RUN_DIR/.secret, created 0600 if missing. Creation writes a temp file and hard-links it into place,
    so a supervisor on another node never reads a half-written secret and exactly one creator wins."""
    path = Path(run_dir) / SECRET_NAME
    if not path.exists():
        tmp = path.with_name(f"{SECRET_NAME}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(_SECRET_BYTES).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another supervisor created it first: use theirs
        finally:
            tmp.unlink()
    return read_secret(run_dir)


def read_secret(run_dir: Path) -> bytes:
    """RUN_DIR/.secret, checked (owned by this user, 0600, not a symlink); ConfigError says why not."""
    path = Path(run_dir) / SECRET_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the run secret ({err.strerror or err})") from None
    try:
        _check_owner_only(path, os.fstat(fd))
        raw = os.read(fd, 4 * _SECRET_BYTES).strip()
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(raw.decode())
    except ValueError:
        raise ConfigError(f"{path}: not a hex secret") from None
    if len(secret) < 16:
        raise ConfigError(f"{path}: secret shorter than 16 bytes")
    return secret


def derive(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (e.g. one attempt's rank rendezvous)."""
    return hmac.new(secret, b"resilient\0" + purpose.encode(), hashlib.sha256).digest()
