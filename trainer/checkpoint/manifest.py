"""Checksums computed by the writers, the completion marker with its seal, and verification.

Each rank's background writer hashes the files it wrote (`.sums.rank{R}.json`); after every rank
finalized, rank 0 assembles the manifest (every file, size, checksum) into the marker and seals it:
the run's id and an HMAC of the whole manifest under a key derived from the run's secret. Verification
checks the seal first (another run's checkpoint, or one sealed by none, is refused: never loaded),
then sizes always and checksums on request, spreading the hashing over the ranks.

What the seal protects: the manifest names every file with its size and xxh3 checksum, so a planted or
copied checkpoint (another run's, or an edited manifest) fails it. The files' checksums stay xxh3, which
catches corruption at the writer's speed; that no one else can replace a file in place with one of the
same checksum rests on the directory checks (the whole path to the checkpoint directory is this user's
alone: resilient.core.permissions).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import zlib
from pathlib import Path
from typing import Any

import xxhash

from resilient.core import beneath
from resilient.core.atomic import atomic_write
from resilient.core.errors import CheckpointError
from resilient.core.progress import track
from resilient.core.secret import RunKey
from trainer.checkpoint import ondisk, safe_pickle
from trainer.checkpoint.ondisk import MARKER

SUMS_PREFIX = ".sums.rank"
_CHUNK = 8 << 20
# The checksum new checkpoints record: xxh3-64 catches the corruption it is there for (flipped bits,
# torn or truncated writes) at ~4x zlib.crc32's speed (the writer pays it on every save, and releases
# the GIL while hashing). Checkpoints from before carry crc32 or blake2b and still verify.
CHECKSUM = "xxh3"
ALGORITHMS = ("xxh3", "crc32", "blake2b")
"""Every checksum a manifest may carry, newest first: verification uses the first one present."""


class Crc32:
    """zlib.crc32 with hashlib's update/hexdigest (it releases the GIL on large buffers too)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: Any) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def new_digest(algorithm: str = CHECKSUM) -> Any:
    if algorithm == "xxh3":
        return xxhash.xxh3_64()
    return Crc32() if algorithm == "crc32" else hashlib.blake2b(digest_size=20)


def hexdigest(data: Any, algorithm: str = CHECKSUM) -> str:
    """The checksum of one in-memory buffer."""
    digest = new_digest(algorithm)
    digest.update(data)
    return digest.hexdigest()


SEAL = "checkpoint manifest v1"
"""The purpose of the manifest's MAC key (resilient.core.secret.RunKey)."""
ADOPT_HINT = "resilient ckpt adopt RUN_DIR"


def _no_link(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def hash_file(path: Path, algorithm: str = CHECKSUM) -> str:
    digest = new_digest(algorithm)
    with open(path, "rb", opener=_no_link) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def describe(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, CHECKSUM: hash_file(path)}


def rank_files(ckpt_dir: Path, rank: int) -> list[Path]:
    """The data files megatron's torch_dist writer produced for one global rank."""
    return sorted(ckpt_dir.glob(f"__{rank}_*.distcp"))


def write_rank_sums(ckpt_dir: Path, rank: int, sums: dict[str, Any] | None = None) -> None:
    """Run by the writer after its files are on disk: the checksums it vouches for (hashed as it
    wrote them, or else read back from disk)."""
    if sums is None:
        sums = {p.name: describe(p) for p in rank_files(ckpt_dir, rank)}
    atomic_write(ckpt_dir / f"{SUMS_PREFIX}{rank}.json", json.dumps(sums).encode())


def build_manifest(ckpt_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Merge the writers' checksums and hash the remaining (metadata) files once."""
    files: dict[str, Any] = {}
    for sums in sorted(ckpt_dir.glob(f"{SUMS_PREFIX}*.json")):
        files.update(json.loads(sums.read_text()))
    for path in sorted(ckpt_dir.iterdir()):
        if path.is_file() and path.name not in files and path.name != MARKER and not path.name.startswith(SUMS_PREFIX):
            files[path.name] = describe(path)
    return {
        "format": 1,
        "committed_at": time.time(),
        "meta": meta,
        "files": files,
        "bytes": sum(f["size"] for f in files.values()),
    }


def _sealed_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != "mac"}, sort_keys=True, separators=(",", ":")).encode()


def seal(manifest: dict[str, Any], key: RunKey) -> dict[str, Any]:
    """The manifest bound to the run of `key`: its id and the MAC over everything else."""
    bound = {**{k: v for k, v in manifest.items() if k != "mac"}, "run_id": key.run_id}
    return {**bound, "mac": key.mac(SEAL, _sealed_bytes(bound))}


def seal_problem(manifest: dict[str, Any], key: RunKey, name: str) -> tuple[bool, str] | None:
    """None if the manifest is sealed by the run of `key`; else (foreign, why): `foreign` when it is
    another run's or sealed by none (the run must refuse it), not when its seal fails (damage or tampering:
    the checkpoint is passed over like a damaged one)."""
    if "mac" not in manifest:
        return True, (
            f"{name} is sealed by no run (written before checkpoints were bound to their run, or "
            f"planted); refusing to load it. If it is this run's own: {ADOPT_HINT}"
        )
    if manifest.get("run_id") != key.run_id:
        return True, (
            f"{name} belongs to run {manifest.get('run_id')!s:.40}, not to this run ({key.run_id}); "
            "refusing to load another run's checkpoint (move it out of the checkpoint directory)"
        )
    if not key.verify(SEAL, _sealed_bytes(manifest), manifest["mac"]):
        return False, f"{name}: its seal does not verify (the manifest was altered or forged)"
    return None


def commit(ckpt_dir: Path, meta: dict[str, Any], key: RunKey | None) -> dict[str, Any]:
    """Write the marker (atomically), sealed with `key` (None: unsealed, only for tests that plant
    checkpoints of before): from now on the checkpoint exists."""
    manifest = build_manifest(ckpt_dir, meta)
    if key is not None:
        manifest = seal(manifest, key)
    atomic_write(ckpt_dir / MARKER, json.dumps(manifest, indent=1, sort_keys=True).encode())
    for sums in ckpt_dir.glob(f"{SUMS_PREFIX}*.json"):
        sums.unlink()
    return manifest


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The marker's manifest (never read through a link); raises ValueError with the reason when
    missing or unreadable."""
    try:
        manifest = json.loads(beneath.read_beneath(ckpt_dir, MARKER))
    except FileNotFoundError:
        raise ValueError(f"{ckpt_dir.name}: no completion marker ({MARKER})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{ckpt_dir.name}: completion marker is not valid JSON") from None
    except OSError as err:
        raise ValueError(f"{ckpt_dir.name}: completion marker unreadable ({err.strerror or err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(f"{ckpt_dir.name}: completion marker has no file list")
    return manifest


def verify(
    ckpt_dir: Path, *, checksums: bool, share: tuple[int, int] = (0, 1), key: RunKey | None = None
) -> str | None:
    """None if intact, else the first problem found. With `key`, the seal first: a checkpoint of another
    run (or sealed by none) raises CheckpointError, one whose seal fails is a problem. `share=(i, n)`
    hashes only every n-th file from i, so n ranks verify a checkpoint together; sizes are always
    checked in full."""
    try:
        manifest = read_manifest(ckpt_dir)
    except ValueError as err:
        return str(err)
    if key is not None and (sealed := seal_problem(manifest, key, ckpt_dir.name)):
        foreign, why = sealed
        if foreign:
            raise CheckpointError(why)
        return why
    index, count = share
    files = sorted(manifest["files"].items())
    total = sum(e["size"] for _, e in files)
    for i, (name, expected) in track(
        enumerate(files), f"verifying {ckpt_dir.name}", total=total, weight=lambda item: item[1][1]["size"]
    ):
        if "/" in name or name in (".", ".."):
            return f"{ckpt_dir.name}: the manifest names {name!r}, not a file of the checkpoint"
        path = ckpt_dir / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return f"{ckpt_dir.name}/{name}: missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{ckpt_dir.name}/{name}: not a regular file"
        if st.st_size != expected["size"]:
            return f"{ckpt_dir.name}/{name}: size {st.st_size} != {expected['size']} in the manifest"
        algorithm = next((a for a in ALGORITHMS if a in expected), CHECKSUM)
        try:
            if checksums and i % count == index and hash_file(path, algorithm) != expected.get(algorithm):
                return f"{ckpt_dir.name}/{name}: checksum mismatch (content changed after commit)"
        except OSError as err:
            return f"{ckpt_dir.name}/{name}: unreadable ({err.strerror or err})"
    # A manifest can be recomputed by whoever planted the files: the metadata pickle must also hold
    # nothing but checkpoint metadata before torch unpickles it.
    if safe_pickle.METADATA in manifest["files"]:
        try:
            safe_pickle.check_metadata(ckpt_dir)
        except CheckpointError as err:
            return str(err)
    return None


def identity_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first architecture field that differs, as a one-line reason (parallel layout may differ:
    dist_checkpointing reshards tensor- and data-parallel changes)."""
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            return f"{key}: checkpoint has {saved.get(key)!r}, this run has {current.get(key)!r}"
    return None


def recorded_mismatch(root: Path, architecture: dict[str, Any]) -> str | None:
    """How the newest committed checkpoint under `root` differs from `architecture` (the model's fields),
    or None (also when there is none). Read from the marker (JSON): nothing is unpickled."""
    steps = ondisk.committed_steps(root)
    if not steps:
        return None
    try:
        saved = read_manifest(ondisk.step_dir(root, steps[-1])).get("meta", {}).get("identity") or {}
    except ValueError:
        return None  # a damaged marker is the loader's business (it falls back or refuses)
    saved = {k: v for k, v in saved.items() if k != "padded_vocab"}  # follows tp, which may change
    mismatch = identity_mismatch(saved, architecture) if saved else None
    return f"step {steps[-1]}: {mismatch}" if mismatch else None
