"""What each Megatron-LM `--ckpt-format` leaves in one checkpoint directory, and whether it is whole.

    torch_dist     metadata.json (written last), .metadata, __R_N.distcp; the common state (args,
                   iteration, ...) in common.pt (as megatron-core 0.16.1 writes it) or as the
                   `common_state` item inside the .distcp files (0.19); with --verify-integrity also
                   integrity.json (sha256 of every other file, written after metadata.json)
    torch_dcp,     .metadata and __R_N.distcp only (torch.distributed.checkpoint.save); the items are
    fsdp_dtensor   Megatron-LM's state dict keys: `iteration`, `args`, `model...`
    torch          mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt (torch.save), one directory per model-parallel
                   rank, each with distrib_optim.pt beside it when the distributed optimizer saved its state

Structure (`checksums=False`, cheap enough for every supervisor attempt): every file `.metadata`
names is present and as long as the byte ranges recorded there; the small torch.save archives
(common.pt, the common-state and `iteration` items) and every legacy file are whole zip archives
(torch.save writes the central directory last); legacy rank directories form a full grid; the files
integrity.json lists exist. Content (`checksums=True`): integrity.json's sha256 digests and the
CRC-32 of every member of those archives.
Nothing is unpickled except `.metadata`, through trainer.checkpoint.safe_pickle's allowlist.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

from resilient.core.errors import CheckpointError
from trainer.checkpoint import safe_pickle

STORAGE_METADATA = safe_pickle.METADATA
SHARDED_CONFIG = "metadata.json"
COMMON = "common.pt"
INTEGRITY = "integrity.json"
LEGACY_MODEL = "model_optim_rng.pt"
LEGACY_OPTIMIZER = "distrib_optim.pt"
# dist_checkpointing's key of the common state saved as a ShardedObject (megatron-core 0.19).
COMMON_STATE_ITEM = "common_state/shard_0_1"
# Megatron-LM reads only these items of a torch_dcp / fsdp_dtensor save before the sharded load.
DCP_ITEMS = ("iteration", "args")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2,})(?:_(\d{3,}))?(?:_(\d{3,}))?$")
_HASH_CHUNK = 1 << 20


TORCH, TORCH_DIST, DCP, UNKNOWN = "torch", "torch_dist", "torch_dcp/fsdp_dtensor", "unknown"


class _Damaged(Exception):
    """The first problem found, as one line."""


def save_format(ckpt_dir: Path) -> str:
    """TORCH (legacy), TORCH_DIST, DCP (torch_dcp or fsdp_dtensor: the same files) or UNKNOWN, told the
    way Megatron-LM's loader tells them (rank directories, then metadata.json, then .metadata)."""
    if any(p.name.startswith("mp_rank_") for p in _children(ckpt_dir)):
        return TORCH
    if (ckpt_dir / SHARDED_CONFIG).exists():
        return TORCH_DIST
    if (ckpt_dir / STORAGE_METADATA).exists():
        return DCP
    return UNKNOWN


def check(ckpt_dir: Path, *, checksums: bool = False) -> str | None:
    """None when the checkpoint directory is whole, else the first problem found (one line)."""
    checks = {TORCH: _check_legacy, TORCH_DIST: _check_torch_dist, DCP: _check_dcp}
    try:
        fmt = save_format(ckpt_dir)
        if fmt == UNKNOWN:
            raise _Damaged(
                f"{ckpt_dir.name}: neither {SHARDED_CONFIG}, {STORAGE_METADATA} nor mp_rank_* (the save never finished)"
            )
        checks[fmt](ckpt_dir, checksums)
        _check_integrity(ckpt_dir, checksums)
    except _Damaged as damage:
        return str(damage)
    except OSError as err:
        where = Path(err.filename).name if err.filename else ckpt_dir.name
        return f"{ckpt_dir.name}: {where} unreadable ({err.strerror or err})"
    return None


def _children(path: Path) -> list[Path]:
    return sorted(path.iterdir()) if path.is_dir() else []


# -- torch_dist and torch.distributed.checkpoint ---------------------------------------------------------


def _check_torch_dist(ckpt_dir: Path, checksums: bool) -> None:
    try:
        config = json.loads((ckpt_dir / SHARDED_CONFIG).read_text())
    except (ValueError, UnicodeDecodeError):
        raise _Damaged(f"{ckpt_dir.name}/{SHARDED_CONFIG}: not valid JSON") from None
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != "torch_dist":
        raise _Damaged(f"{ckpt_dir.name}: sharded backend {backend!r} is not torch_dist (cannot verify)")
    metadata = _storage_metadata(ckpt_dir)
    _check_extents(ckpt_dir, metadata)
    common = ckpt_dir / COMMON
    if common.exists():
        _check_archive(common, f"{ckpt_dir.name}/{COMMON}", checksums)
    elif COMMON_STATE_ITEM in _items(metadata):
        _check_item(ckpt_dir, metadata, COMMON_STATE_ITEM, checksums)
    else:
        raise _Damaged(
            f"{ckpt_dir.name}: no common state (neither {COMMON} nor a common_state item in {STORAGE_METADATA})"
        )


def _check_dcp(ckpt_dir: Path, checksums: bool) -> None:
    metadata = _storage_metadata(ckpt_dir)
    missing = [key for key in DCP_ITEMS if key not in _items(metadata)]
    if missing:
        raise _Damaged(
            f"{ckpt_dir.name}: {STORAGE_METADATA} records no {missing[0]!r} item and there is no "
            f"{SHARDED_CONFIG}: an unfinished torch_dist save, or not Megatron-LM's"
        )
    _check_extents(ckpt_dir, metadata)
    _check_item(ckpt_dir, metadata, "iteration", checksums)


def _storage_metadata(ckpt_dir: Path) -> Any:
    if not (ckpt_dir / STORAGE_METADATA).exists():
        raise _Damaged(f"{ckpt_dir.name}: no {STORAGE_METADATA} (the save never finished)")
    try:
        metadata = safe_pickle.load_metadata(ckpt_dir)
    except CheckpointError as err:
        raise _Damaged(str(err)) from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not storage or not isinstance(_items(metadata), dict):
        raise _Damaged(f"{ckpt_dir.name}/{STORAGE_METADATA}: not a torch.distributed.checkpoint metadata")
    for info in storage.values():
        name = getattr(info, "relative_path", None)
        if not _plain_name(name):
            raise _Damaged(f"{ckpt_dir.name}/{STORAGE_METADATA}: bad storage file name {name!r}")
        if not all(_non_negative_int(getattr(info, field, None)) for field in ("offset", "length")):
            raise _Damaged(f"{ckpt_dir.name}/{STORAGE_METADATA}: bad byte range for {name}")
    return metadata


def _non_negative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _items(metadata: Any) -> dict:
    return getattr(metadata, "state_dict_metadata", None)


def _plain_name(name: object) -> bool:
    """A file directly inside the checkpoint directory: no path, no parent, nothing hidden above it."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _check_extents(ckpt_dir: Path, metadata: Any) -> None:
    """Every storage file holds at least the bytes its recorded items end at."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        try:
            size = (ckpt_dir / name).stat().st_size
        except FileNotFoundError:
            raise _Damaged(f"{ckpt_dir.name}/{name}: missing") from None
        if size < end:
            raise _Damaged(f"{ckpt_dir.name}/{name}: truncated ({size} bytes, {STORAGE_METADATA} records {end})")


def _check_item(ckpt_dir: Path, metadata: Any, key: str, checksums: bool) -> None:
    """A bytes item (a torch.save archive written into a .distcp file) is a whole archive."""
    infos = [info for index, info in metadata.storage_data.items() if getattr(index, "fqn", None) == key]
    if not infos:
        raise _Damaged(f"{ckpt_dir.name}/{STORAGE_METADATA}: item {key!r} has no storage record")
    info = infos[0]
    if getattr(info, "transform_descriptors", None):
        return  # stored through a transform (e.g. compressed): the extents above are what can be checked
    with open(ckpt_dir / info.relative_path, "rb") as f:
        f.seek(info.offset)
        blob = f.read(info.length)
    _check_archive(io.BytesIO(blob), f"{ckpt_dir.name}/{info.relative_path} (item {key!r})", checksums)


def _check_archive(source: Path | io.BytesIO, label: str, checksums: bool) -> None:
    """A torch.save file is a zip archive whose central directory is written last; `checksums` also
    reads every member against its CRC-32."""
    try:
        with zipfile.ZipFile(source) as archive:
            bad = archive.testzip() if checksums else None
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, NotImplementedError):
        raise _Damaged(f"{label}: not a whole torch.save archive (truncated?)") from None
    except FileNotFoundError:
        raise _Damaged(f"{label}: missing") from None
    if bad is not None:
        raise _Damaged(f"{label}: member {bad} fails its CRC-32 (damaged)")


# -- legacy torch format ---------------------------------------------------------------------------------


def _check_legacy(ckpt_dir: Path, checksums: bool) -> None:
    ranks: dict[tuple[int, ...], Path] = {}
    for child in _children(ckpt_dir):
        if not child.name.startswith("mp_rank_"):
            continue
        match = _RANK_DIR.match(child.name)
        if match is None or not child.is_dir():
            raise _Damaged(f"{ckpt_dir.name}/{child.name}: not a model-parallel rank directory")
        ranks[tuple(int(g) for g in match.groups() if g is not None)] = child
    _check_rank_grid(ckpt_dir, ranks)
    with_optimizer = [d for d in ranks.values() if (d / LEGACY_OPTIMIZER).exists()]
    for rank_dir in ranks.values():
        if with_optimizer and rank_dir not in with_optimizer:
            raise _Damaged(
                f"{ckpt_dir.name}/{rank_dir.name}/{LEGACY_OPTIMIZER}: missing (the distributed "
                f"optimizer wrote it beside {with_optimizer[0].name})"
            )
        if not (rank_dir / LEGACY_MODEL).exists():
            raise _Damaged(f"{ckpt_dir.name}/{rank_dir.name}/{LEGACY_MODEL}: missing")
        for path in sorted(rank_dir.glob("*.pt")):
            _check_archive(path, f"{ckpt_dir.name}/{rank_dir.name}/{path.name}", checksums)


def _check_rank_grid(ckpt_dir: Path, ranks: dict[tuple[int, ...], Path]) -> None:
    """Megatron-LM names one directory per (tensor[, pipeline][, expert]) rank: every combination of
    the ranks seen, from 0 up, must be there. (A missing highest rank on every axis cannot be told:
    the parallel sizes live only inside the pickled args.)"""
    if len({len(key) for key in ranks}) > 1:
        raise _Damaged(
            f"{ckpt_dir.name}: model-parallel rank directories of different shapes "
            f"({', '.join(d.name for d in ranks.values())})"
        )
    axes = len(next(iter(ranks)))
    sizes = [max(key[axis] for key in ranks) + 1 for axis in range(axes)]
    expected = [()]
    for size in sizes:
        expected = [key + (i,) for key in expected for i in range(size)]
    absent = [key for key in expected if key not in ranks]
    if absent:
        name = "mp_rank_" + "_".join(f"{i:02d}" if n == 0 else f"{i:03d}" for n, i in enumerate(absent[0]))
        raise _Damaged(
            f"{ckpt_dir.name}/{name}: missing ({len(absent)} of {len(expected)} model-parallel rank directories absent)"
        )


# -- --verify-integrity --------------------------------------------------------------------------------


def _check_integrity(ckpt_dir: Path, checksums: bool) -> None:
    """integrity.json (dist_checkpointing's `verify_integrity`): {"algorithm": "sha256", "files": {name:
    hex digest}} over every other file of the directory; a missing, unreadable or differing file is damage."""
    path = ckpt_dir / INTEGRITY
    if not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise _Damaged(f"{ckpt_dir.name}/{INTEGRITY}: not valid JSON") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(_plain_name(n) and isinstance(h, str) for n, h in files.items()):
        raise _Damaged(f"{ckpt_dir.name}/{INTEGRITY}: no {{file name: digest}} map")
    algorithm = manifest.get("algorithm", "sha256")
    if algorithm != "sha256":
        raise _Damaged(f"{ckpt_dir.name}/{INTEGRITY}: unknown hash algorithm {algorithm!r}")
    for name, expected in sorted(files.items()):
        target = ckpt_dir / name
        if not target.is_file():
            raise _Damaged(f"{ckpt_dir.name}/{name}: missing (listed in {INTEGRITY})")
        if checksums and _sha256(target) != expected.lower():
            raise _Damaged(f"{ckpt_dir.name}/{name}: sha256 differs from {INTEGRITY} (damaged)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
