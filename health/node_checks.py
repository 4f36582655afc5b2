"""Node checks: checkpoint directory (free space, write + fsync), host memory, /dev/shm size.

The measurements are side effects at the edge (`measure_*`); the judgements are pure (`judge_*`).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import psutil

from health.config import HealthConfig
from health.types import CheckResult, fatal, ok

GIB = 1 << 30


def write_test(directory: Path, nbytes: int) -> tuple[float | None, str]:
    """Write nbytes to a fresh owner-only file in `directory`, fsync it and remove it.

    Returns (seconds, "") on success, (None, error) on failure (ENOSPC, EROFS, EIO, ...)."""
    path = directory / f".health-write-test.{os.getpid()}"
    block = os.urandom(min(nbytes, 1 << 20))
    t0 = time.monotonic()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            left = nbytes
            while left > 0:
                left -= os.write(fd, block[: min(left, len(block))])
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.monotonic() - t0, ""
    except OSError as err:
        return None, f"{err.strerror or err} ({type(err).__name__})"
    finally:
        path.unlink(missing_ok=True)


def check_ckpt_dir(ckpt: Path, cfg: HealthConfig) -> CheckResult:
    """The checkpoint directory's filesystem has the configured free space and accepts a durable
    write. A directory not made yet is judged by its nearest existing parent: a check creates nothing."""
    name, ckpt = "node.ckpt_dir", Path(ckpt)
    probe = next(p for p in (ckpt, *ckpt.parents) if p.exists() or p == p.parent)
    if not probe.is_dir():
        return fatal(name, f"{ckpt}: {probe} is not a directory", path=str(ckpt))
    try:
        free = shutil.disk_usage(probe).free
    except OSError as err:
        return fatal(name, f"{ckpt}: {err.strerror or err}", path=str(ckpt))
    seconds, error = write_test(probe, cfg.write_test_bytes)
    return judge_ckpt_dir(str(ckpt), free, seconds, error, cfg)


def judge_ckpt_dir(
    path: str, free_bytes: int, write_s: float | None, write_error: str, cfg: HealthConfig
) -> CheckResult:
    name = "node.ckpt_dir"
    values = {"path": path, "free_gib": round(free_bytes / GIB, 3), "write_seconds": write_s}
    if write_s is not None:
        values["write_mb_per_s"] = round(cfg.write_test_bytes / max(write_s, 1e-9) / 1e6, 1)
    problems = []
    if free_bytes < cfg.ckpt_min_free_gib * GIB:
        problems.append(f"{free_bytes / GIB:.3f} GiB free, need {cfg.ckpt_min_free_gib} GiB")
    if write_s is None:
        problems.append(f"write+fsync of {cfg.write_test_bytes} bytes failed: {write_error}")
    if problems:
        return fatal(name, f"{path}: " + "; ".join(problems), **values)
    return ok(name, f"{path}: {free_bytes / GIB:.1f} GiB free, write+fsync ok", **values)


def check_memory(cfg: HealthConfig) -> CheckResult:
    return judge_memory(psutil.virtual_memory().available, cfg)


def judge_memory(available_bytes: int, cfg: HealthConfig) -> CheckResult:
    name, gib = "node.memory", available_bytes / GIB
    if available_bytes < cfg.mem_min_available_gib * GIB:
        return fatal(
            name, f"{gib:.2f} GiB available, need {cfg.mem_min_available_gib} GiB", available_gib=round(gib, 3)
        )
    return ok(name, f"{gib:.1f} GiB available", available_gib=round(gib, 3))


def check_shm(cfg: HealthConfig) -> CheckResult:
    try:
        total = shutil.disk_usage(cfg.shm_path).total
    except OSError as err:
        return fatal("node.shm", f"{cfg.shm_path}: {err.strerror or err}")
    return judge_shm(total, cfg)


def judge_shm(total_bytes: int, cfg: HealthConfig) -> CheckResult:
    name, gib = "node.shm", total_bytes / GIB
    if total_bytes < cfg.shm_min_gib * GIB:
        return fatal(name, f"{cfg.shm_path} is {gib:.3f} GiB, need {cfg.shm_min_gib} GiB", size_gib=round(gib, 3))
    return ok(name, f"{cfg.shm_path} is {gib:.1f} GiB", size_gib=round(gib, 3))


def node_checks(ckpt_dir: Path, cfg: HealthConfig) -> list[CheckResult]:
    """The node checks against the run's checkpoint directory (`checkpoint.dir`, not a guess)."""
    return [check_ckpt_dir(ckpt_dir, cfg), check_memory(cfg), check_shm(cfg)]
