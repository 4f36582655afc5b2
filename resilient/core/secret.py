"""The run's secret (RUN_DIR/.secret, 0600) and what is derived from it: the run's id and keyed MACs.

Whoever comes first (a supervisor, or a rank run without one) creates the secret; it lives as long as
the run directory, across attempts and requeues, so a re-created run directory is a new run. Each use
gets its own key (HMAC of the secret with the purpose): the file's bytes never key anything directly,
and a MAC made for one purpose never verifies for another. The run id names the run in manifests and
snapshots without revealing the secret.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from resilient.core import beneath
from resilient.core.errors import ConfigError

SECRET_NAME = ".secret"
_SECRET_BYTES = 32


def _refusal(path: Path, err: OSError) -> ConfigError:
    if err.errno == errno.ELOOP:
        return ConfigError(
            f"{path} is a symbolic link; refusing it as the run secret (remove it, or restore the run's own .secret)"
        )
    if err.errno == errno.EISDIR:
        return ConfigError(
            f"{path} is not a regular file; refusing it as the run secret (remove it, or restore the run's own .secret)"
        )
    return ConfigError(f"{path}: cannot read the run secret ({err.strerror or err})")


def _read(run_dir: Path) -> bytes:
    path = run_dir / SECRET_NAME
    try:
        fd = beneath.open_beneath(run_dir, SECRET_NAME, flags=os.O_RDONLY)
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise _refusal(path, err) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refusal(path, OSError(errno.EISDIR, "not a regular file"))
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{path}: owned by uid {st.st_uid}, not by this user; refusing the run secret")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read it; "
                f"the run secret must be 0600 (chmod 600 {path})"
            )
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


def _create(run_dir: Path) -> None:
    """Write a temp file and hard-link it into place: a reader on another node never sees half a
    secret, and exactly one creator wins."""
    tmp = f"{SECRET_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
    dir_fd = beneath.open_dir(run_dir)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            os.write(fd, secrets.token_hex(_SECRET_BYTES).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, SECRET_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            os.unlink(tmp, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def load_or_create(run_dir: Path) -> bytes:
    """RUN_DIR/.secret, created 0600 if missing; anything else in its place is one ConfigError."""
    run_dir = Path(run_dir)
    try:
        return _read(run_dir)
    except FileNotFoundError:
        pass
    try:
        _create(run_dir)
        return _read(run_dir)
    except OSError as err:
        raise _refusal(run_dir / SECRET_NAME, err) from None


def load(run_dir: Path) -> bytes | None:
    """RUN_DIR/.secret if it exists (None if not); never creates it."""
    try:
        return _read(Path(run_dir))
    except FileNotFoundError:
        return None


def read(run_dir: Path) -> bytes:
    """RUN_DIR/.secret, which must exist (a rank reads what its supervisor created); ConfigError if not."""
    found = load(run_dir)
    if found is None:
        raise ConfigError(f"{Path(run_dir) / SECRET_NAME}: missing; the run secret is created by the supervisor")
    return found


def derive(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one purpose (the coordination store, one attempt's rank rendezvous, a MAC's use)."""
    return hmac.new(secret, b"resilient\0" + purpose.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class RunKey:
    """Keys derived from one run's secret."""

    secret: bytes = field(repr=False)

    @classmethod
    def of(cls, run_dir: Path) -> RunKey:
        """The key of the run in `run_dir` (its secret created if missing)."""
        return cls(load_or_create(run_dir))

    def _key(self, purpose: str) -> bytes:
        return derive(self.secret, purpose)

    @property
    def run_id(self) -> str:
        """The run's public name: stable for the run directory's life, says nothing of the secret."""
        return self._key("run id v1").hex()[:16]

    def mac(self, purpose: str, data: bytes) -> str:
        """HMAC-SHA256 of `data` under the key for `purpose` (hex)."""
        return hmac.new(self._key(purpose), data, hashlib.sha256).hexdigest()

    def verify(self, purpose: str, data: bytes, mac: object) -> bool:
        return isinstance(mac, str) and hmac.compare_digest(self.mac(purpose, data), mac)
