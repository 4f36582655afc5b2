"""`resilient ckpt list|verify|repair|inspect|digest DIR`.

DIR is a run directory, its checkpoints/ directory, or a Megatron-LM save directory
(`latest_checkpointed_iteration.txt` + `iter_NNNNNNN/` or `release/`, and `non_persistent/`, in every
--ckpt-format); list, verify and repair understand both layouts.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional

import typer

from resilient.core.errors import CheckpointError, ConfigError
from resilient.core.exit_codes import ExitCode
from trainer.checkpoint import inspect as ck
from trainer.checkpoint import layout, manifest
from trainer.megatron_lm import checkpoints as megatron_lm
from trainer.checkpoint.config import CheckpointConfig

ckpt_app = typer.Typer(help="Inspect, check and repair checkpoints (DIR: RUN_DIR, RUN_DIR/checkpoints or a "
                            "Megatron-LM save directory).", no_args_is_help=True)


@ckpt_app.command("list")
def list_cmd(directory: Path, as_json: bool = typer.Option(False, "--json", help="JSON output"),
             memory_dir: Optional[Path] = typer.Option(
                 None, "--memory-dir", help="the run's memory tier (default: the one derived from RUN_DIR)")) -> None:
    """Every step (iteration) directory, complete or not, and which one `latest` (the tracker) names; for a
    run directory also the memory tier: each node's own snapshots and the replicas it holds (checksums verified)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory")
    root = ck.resolve_root(directory)
    if megatron_lm.is_layout(root):
        with _readable(root):
            rows = megatron_lm.listing(root)
    else:
        rows = [{"tier": "disk", **row} for row in ck.listing(root)]
        memory = memory_dir or (CheckpointConfig().memory_root(directory) if root != directory else None)
        if memory is not None and memory.is_dir():
            from trainer.checkpoint.memory.listing import listing as memory_listing

            rows += memory_listing(memory)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        why = f"  ({row['problem']})" if row.get("problem") else ""
        latest = "  <- latest" if row.get("latest") else ""
        tier = row.get("tier", "disk")
        if tier.startswith("memory"):
            held = f" of node{row['of_node']}" if row["of_node"] is not None else ""
            tier = f"{tier} node{row['node']}{held} ranks {','.join(map(str, row['ranks']))}"
        if "format" in row:
            tier = f"{tier} {row['format']}"
        print(f"{row['step']:>9}  {row['state']:<10} {row['bytes']:>14,} B  {tier}{latest}{why}")


@ckpt_app.command("verify")
def verify_cmd(directory: Path,
               step: Optional[int] = typer.Option(
                   None, help="step (default: newest complete; Megatron-LM: what each tracker names)"),
               sizes_only: bool = typer.Option(False, "--sizes-only", help="skip checksums"),
               as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Own layout: the marker, every file's size and checksum. Megatron-LM: what each tracker (persistent,
    non_persistent/) names, in any --ckpt-format: every file the storage metadata names with its recorded
    size, the common state, every model-parallel rank's files, integrity.json's sha256 digests.
    Exit 0 intact, CHECKPOINT_DAMAGED otherwise."""
    root = ck.resolve_root(directory)
    if megatron_lm.is_layout(root):
        with _readable(root):
            checks = _verify_megatron_lm(root, step, checksums=not sizes_only)
    else:
        chosen = ck.pick_step(root, step)
        checks = [("disk", chosen, manifest.verify(layout.step_dir(root, chosen), checksums=not sizes_only))]
    problems = [problem for _, _, problem in checks if problem is not None]
    if as_json:
        tiers = [{"tier": tier, "step": at, "ok": problem is None, "problem": problem} for tier, at, problem in checks]
        print(json.dumps({"step": checks[0][1], "ok": not problems, "problem": problems[0] if problems else None,
                          **({"tiers": tiers} if len(checks) > 1 else {})}))
    else:
        for tier, at, problem in checks:
            print(f"{_tier_prefix(tier)}step {at}: " + ("intact" if problem is None else f"DAMAGED: {problem}"))
    if problems:
        raise typer.Exit(int(ExitCode.CHECKPOINT_DAMAGED))


def _verify_megatron_lm(root: Path, step: int | None, *, checksums: bool) -> list[tuple[str, object, str | None]]:
    """With a step: that iteration (persistent tier first); else what every tier's tracker names, the
    tier Megatron-LM resumes from first."""
    if step is not None:
        for tier, path in megatron_lm.tiers(root):
            if step in megatron_lm.iterations(path):
                return [(tier, step, megatron_lm.check(megatron_lm.iteration_dir(path, step), checksums=checksums))]
        raise CheckpointError(f"no iteration directory for {step} in {root}")
    resumes = (megatron_lm.resumes_from(root) or (None,))[0]
    checks = sorted(megatron_lm.verify(root, checksums=checksums), key=lambda c: c.tier != resumes)
    return [(c.tier, c.tracked, c.problem) for c in checks]


def _tier_prefix(tier: str) -> str:
    return "" if tier in ("disk", megatron_lm.PERSISTENT) else f"{tier} "


@contextlib.contextmanager
def _readable(root: Path) -> Iterator[None]:
    """An unreadable directory of the save is one line, not a traceback."""
    try:
        yield
    except OSError as err:
        raise CheckpointError(f"{err.filename or root}: unreadable ({err.strerror or err})") from None


@ckpt_app.command("repair")
def repair_cmd(directory: Path) -> None:
    """Point a `latest` pointer (Megatron-LM: each tracker) that names a missing or incomplete checkpoint
    at the newest complete one, atomically; a pointer naming a complete checkpoint is left alone; nothing
    is deleted. Exit 0 when every pointer names a complete checkpoint afterwards, CHECKPOINT_DAMAGED if not."""
    root = ck.resolve_root(directory)
    if megatron_lm.is_layout(root):
        with _readable(root):
            done = megatron_lm.repair(root)
    else:
        done = [("disk", *ck.repair(root))]
    for tier, _, _, what in done:
        print(_tier_prefix(tier) + what)
    if any(after is None for _, _, after, _ in done):
        raise typer.Exit(int(ExitCode.CHECKPOINT_DAMAGED))


@ckpt_app.command("inspect")
def inspect_cmd(directory: Path, step: Optional[int] = typer.Option(None, help="step (default: newest complete)"),
                as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Step, consumed samples, model and parallel layout, bytes."""
    root = ck.resolve_root(directory)
    info = ck.inspect(root, ck.pick_step(root, step))
    if as_json:
        print(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        print(f"{key:>17}: {value}")


@ckpt_app.command("digest")
def digest_cmd(directory: Path, step: Optional[int] = typer.Option(None, help="step (default: newest complete)")) -> None:
    """One hex digest over model and optimizer tensors (last line of output)."""
    root = ck.resolve_root(directory)
    chosen = ck.pick_step(root, step)
    print(f"step {chosen}")
    print(ck.digest(layout.step_dir(root, chosen)))


def register(app: typer.Typer) -> None:
    """Add `resilient ckpt ...`."""
    app.add_typer(ckpt_app, name="ckpt")
