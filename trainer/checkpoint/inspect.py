"""Offline views of a checkpoint directory: list, verify, inspect, digest (one process, no job)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resilient.core.atomic import atomic_write
from resilient.core.errors import CheckpointError, ConfigError
from resilient.core.secret import RunKey
from trainer.checkpoint import manifest, ondisk

if TYPE_CHECKING:  # `ckpt list|verify|inspect` read files only; torch loads for `digest`
    import torch

# Tensors that make up "the state" for equality: model weights and optimizer moments.
DIGEST_PREFIXES = ("embedding.", "decoder.", "output_layer.", "optimizer.")


def resolve_root(path: Path) -> Path:
    """Accept RUN_DIR or RUN_DIR/checkpoints (or any checkpoint directory); a missing one is a config error."""
    if not path.is_dir():
        raise ConfigError(f"{path}: no such directory")
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def pick_step(root: Path, step: int | None) -> int:
    """The requested step, or the newest committed one."""
    if step is not None:
        if step not in ondisk.step_dirs(root):
            raise CheckpointError(f"no checkpoint directory for step {step} in {root}")
        return step
    committed = ondisk.committed_steps(root)
    if not committed:
        raise CheckpointError(f"no complete checkpoint in {root}")
    return committed[-1]


def listing(root: Path) -> list[dict[str, Any]]:
    latest = ondisk.read_latest(root)
    rows = []
    for step, path in ondisk.step_dirs(root).items():
        agreed = None
        try:
            meta = manifest.read_manifest(path)
            state, size = "complete", meta.get("bytes", 0)
            agreed = meta.get("meta", {}).get("last_agreeing_step")
        except ValueError:
            state, size = "incomplete", sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        rows.append(
            {
                "step": step,
                "state": state,
                "bytes": size,
                "latest": step == latest,
                "path": str(path),
                "last_agreeing_step": agreed,
            }
        )
    return rows


def repair(root: Path) -> tuple[int | None, int | None, str]:
    """Point `latest` at the newest step that verifies (sizes) when it names one that does not;
    returns (before, after, what happened), `after` None when no step verifies."""
    before = ondisk.read_latest(root)
    if before is not None and before in ondisk.step_dirs(root):
        problem = manifest.verify(ondisk.step_dir(root, before), checksums=False)
        if problem is None:
            return before, before, f"latest already names complete step {before}"
    else:
        problem = "latest is missing or names no step directory"
    good = [
        s
        for s in reversed(ondisk.committed_steps(root))
        if manifest.verify(ondisk.step_dir(root, s), checksums=False) is None
    ]
    if not good:
        return before, None, f"{problem}; no complete step to point it at"
    ondisk.write_latest(root, good[0])
    return before, good[0], f"{problem}; latest now names step {good[0]}"


def adopt(root: Path, key: RunKey, steps: list[int]) -> list[tuple[int, bool, str]]:
    """Seal `steps` (committed checkpoints under `root`) for the run of `key` after verifying them in full
    (sizes, checksums, metadata types): the way a checkpoint of before run seals, or one copied from another
    run on purpose, becomes this run's. Returns (step, adopted or already this run's, what happened)."""
    done = []
    for step in steps:
        ckpt_dir = ondisk.step_dir(root, step)
        try:
            found = manifest.read_manifest(ckpt_dir)
        except ValueError as err:
            done.append((step, False, f"not adopted: {err}"))
            continue
        sealed = manifest.seal_problem(found, key, ckpt_dir.name)
        if sealed is None:
            done.append((step, True, "already sealed by this run"))
            continue
        problem = manifest.verify(ckpt_dir, checksums=True)
        if problem:
            done.append((step, False, f"not adopted: {problem}"))
            continue
        was = (
            "sealed by no run"
            if "mac" not in found
            else f"run {found.get('run_id')!s:.40}"
            if sealed[0]
            else "a broken seal"
        )
        atomic_write(ckpt_dir / ondisk.MARKER, json.dumps(manifest.seal(found, key), indent=1, sort_keys=True).encode())
        done.append((step, True, f"adopted by run {key.run_id} (was: {was})"))
    return done


def inspect(root: Path, step: int) -> dict[str, Any]:
    try:
        found = manifest.read_manifest(ondisk.step_dir(root, step))
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return {
        "step": step,
        **found["meta"],
        "bytes": found["bytes"],
        "files": len(found["files"]),
        "committed_at": found["committed_at"],
    }


def _single_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def load_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, unsharded, keyed by its global name; verified (manifest, checksums,
    metadata types) before torch reads anything."""
    from megatron.core import dist_checkpointing

    problem = manifest.verify(ckpt_dir, checksums=True)
    if problem:
        raise CheckpointError(f"{ckpt_dir.name} not loaded: {problem}")

    _single_process_group()
    return dist_checkpointing.load_plain_tensors(str(ckpt_dir))


def digest(ckpt_dir: Path) -> str:
    """One hex digest over model and optimizer tensors in sorted-key order: equal state, equal
    digest, whatever the parallel layout it was saved from."""
    import torch

    tensors = load_tensors(ckpt_dir)
    h = hashlib.sha256()
    for key in sorted(k for k in tensors if k.startswith(DIGEST_PREFIXES)):
        tensor = tensors[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()
