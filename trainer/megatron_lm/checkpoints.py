"""Megatron-LM's own checkpoint layout: list, verify and repair without Megatron-LM installed.

    SAVE_DIR/latest_checkpointed_iteration.txt   the tracker: an iteration number (or `release`)
    SAVE_DIR/iter_0000100/                       torch_dist: metadata.json, common.pt, .metadata,
                                                 __R_N.distcp (one or more per writing rank)
                                                 or legacy: mp_rank_XX[_YYY]/model_optim_rng.pt
A torch_dist iteration is complete when every file its storage metadata (`.metadata`) names is
present and long enough for the byte ranges recorded there; a legacy one when every model-parallel
rank's file is a whole zip archive (torch.save's format; its central directory is written last).
`.metadata` is a pickle: it is read with an unpickler that admits only torch.distributed.checkpoint's
metadata types (and torch.Size/dtype), so a hostile file cannot run code.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from resilient.core.atomic import atomic_write

TRACKER = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")
_STORAGE_METADATA = ".metadata"
_COMMON = "common.pt"
_SHARDED_CONFIG = "metadata.json"
_LEGACY_FILE = "model_optim_rng.pt"


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def is_layout(root: Path) -> bool:
    """Whether `root` looks like a Megatron-LM save directory (tracker or iter_* directories)."""
    return (root / TRACKER).is_file() or bool(iterations(root))


def iterations(root: Path) -> dict[int, Path]:
    """Every iter_* directory, complete or not, by iteration."""
    if not root.is_dir():
        return {}
    found = {}
    for child in root.iterdir():
        match = _ITER_DIR.match(child.name)
        if match and child.is_dir():
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def read_tracker(root: Path) -> int | None:
    """The iteration the tracker names; None when there is no tracker, it says `release` or is unreadable."""
    try:
        text = (root / TRACKER).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError, IsADirectoryError):
        return None
    return int(text) if text.isdigit() else None


def write_tracker(root: Path, iteration: int) -> None:
    """Replace the tracker atomically (Megatron-LM writes the bare number)."""
    atomic_write(root / TRACKER, str(iteration))


# -- torch_dist storage metadata ---------------------------------------------------------------------

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")


class _MetadataUnpickler(pickle.Unpickler):
    """Admits torch.distributed.checkpoint's metadata dataclasses and enums, torch.Size, dtypes and
    layouts, nothing else: no callable with side effects can be reached."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if module in _DCP_MODULES or (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch" and name == "Size":
            return torch.Size
        value = getattr(torch, name, None) if module == "torch" else None
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
        if (module, name) == ("torch.serialization", "_get_layout"):
            return torch.serialization._get_layout
        raise pickle.UnpicklingError(f"{module}.{name} is not a checkpoint metadata type")


def storage_extents(ckpt_dir: Path) -> dict[str, int]:
    """File name -> bytes its storage metadata says it holds (the end of its last recorded item).
    Raises ValueError with the reason when `.metadata` is missing or not a torch_dist metadata."""
    path = ckpt_dir / _STORAGE_METADATA
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise ValueError(f"{ckpt_dir.name}: no {_STORAGE_METADATA} (the save never finished)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as err:
        raise ValueError(f"{ckpt_dir.name}/{_STORAGE_METADATA}: unreadable ({err})") from None
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(storage, dict) or not storage:
        raise ValueError(f"{ckpt_dir.name}/{_STORAGE_METADATA}: names no storage files")
    extents: dict[str, int] = {}
    for info in storage.values():
        name, end = getattr(info, "relative_path", None), getattr(info, "offset", 0) + getattr(info, "length", 0)
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise ValueError(f"{ckpt_dir.name}/{_STORAGE_METADATA}: bad storage file name {name!r}")
        extents[name] = max(extents.get(name, 0), end)
    return extents


def check_iteration(ckpt_dir: Path) -> str | None:
    """None if the iteration is complete, else the first problem found."""
    legacy = sorted(ckpt_dir.glob("mp_rank_*"))
    if legacy and not (ckpt_dir / _SHARDED_CONFIG).exists():
        return _check_legacy(ckpt_dir, legacy)
    try:
        config = json.loads((ckpt_dir / _SHARDED_CONFIG).read_text())
    except FileNotFoundError:
        return f"{ckpt_dir.name}: no {_SHARDED_CONFIG} (not a dist_checkpointing save, or unfinished)"
    except (ValueError, UnicodeDecodeError):
        return f"{ckpt_dir.name}/{_SHARDED_CONFIG}: not valid JSON"
    backend = config.get("sharded_backend") if isinstance(config, dict) else None
    if backend != "torch_dist":
        return f"{ckpt_dir.name}: sharded backend {backend!r} is not torch_dist (cannot verify)"
    common = ckpt_dir / _COMMON
    if not common.is_file() or common.stat().st_size == 0:
        return f"{ckpt_dir.name}/{_COMMON}: missing or empty"
    try:
        extents = storage_extents(ckpt_dir)
    except ValueError as err:
        return str(err)
    for name, needed in sorted(extents.items()):
        try:
            size = (ckpt_dir / name).stat().st_size
        except FileNotFoundError:
            return f"{ckpt_dir.name}/{name}: missing"
        if size < needed:
            return f"{ckpt_dir.name}/{name}: truncated ({size} bytes, metadata records {needed})"
    return None


def _check_legacy(ckpt_dir: Path, rank_dirs: list[Path]) -> str | None:
    for rank_dir in rank_dirs:
        path = rank_dir / _LEGACY_FILE
        if not path.is_file():
            return f"{ckpt_dir.name}/{rank_dir.name}/{_LEGACY_FILE}: missing"
        if not zipfile.is_zipfile(path):
            return f"{ckpt_dir.name}/{rank_dir.name}/{_LEGACY_FILE}: not a whole torch.save archive (truncated?)"
    return None


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def listing(root: Path) -> list[dict[str, Any]]:
    """Every iteration with its state (complete / incomplete: problem), bytes and whether the tracker names it."""
    tracked = read_tracker(root)
    rows = []
    for iteration, path in iterations(root).items():
        problem = check_iteration(path)
        rows.append({"step": iteration, "state": "complete" if problem is None else "incomplete", "problem": problem,
                     "bytes": _bytes(path), "latest": iteration == tracked, "path": str(path)})
    return rows


def newest_complete(root: Path) -> int | None:
    return next((it for it, path in reversed(iterations(root).items()) if check_iteration(path) is None), None)


def tracker_problem(root: Path) -> str | None:
    """None when the tracker names a complete iteration, else what is wrong with it."""
    tracked = read_tracker(root)
    if tracked is None:
        return f"{TRACKER} is missing or does not name an iteration"
    if tracked not in iterations(root):
        return f"{TRACKER} names iteration {tracked}, which has no directory"
    problem = check_iteration(iteration_dir(root, tracked))
    return None if problem is None else f"{TRACKER} names iteration {tracked}, which is incomplete: {problem}"


def repair(root: Path) -> tuple[int | None, int | None, str]:
    """Point a broken tracker at the newest complete iteration; a tracker naming a complete iteration
    is left alone (an operator may have rolled back on purpose). Returns (before, after, what happened);
    `after` is None when no complete iteration exists."""
    before = read_tracker(root)
    problem = tracker_problem(root)
    if problem is None:
        return before, before, f"tracker already names complete iteration {before}"
    target = newest_complete(root)
    if target is None:
        return before, None, f"{problem}; no complete iteration to point it at"
    write_tracker(root, target)
    return before, target, f"{problem}; tracker now names iteration {target}"
