"""`resilient ckpt list|verify|repair|inspect|digest DIR`.

DIR is a run directory, its checkpoints/ directory, or a Megatron-LM save directory
(`latest_checkpointed_iteration.txt` + `iter_NNNNNNN/`); list, verify and repair understand both layouts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

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
    """Every step (iteration) directory, complete or not, and which one `latest` (the tracker) names, with the
    last step whose replica check agreed when it was saved; for a run directory also the memory tier: each
    node's own snapshots and the replicas it holds (checksums verified)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory")
    root = ck.resolve_root(directory)
    if megatron_lm.is_layout(root):
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
        if row.get("last_agreeing_step") is not None:
            why = f"  replicas agreed at step {row['last_agreeing_step']}{why}"
        tier = row.get("tier", "disk")
        if tier.startswith("memory"):
            held = f" of node{row['of_node']}" if row["of_node"] is not None else ""
            tier = f"{tier} node{row['node']}{held} ranks {','.join(map(str, row['ranks']))}"
        print(f"{row['step']:>9}  {row['state']:<10} {row['bytes']:>14,} B  {tier}{latest}{why}")


@ckpt_app.command("verify")
def verify_cmd(directory: Path,
               step: Optional[int] = typer.Option(
                   None, help="step (default: newest complete; Megatron-LM: the tracker's)"),
               sizes_only: bool = typer.Option(False, "--sizes-only", help="skip checksums (Megatron-LM: always)"),
               as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Own layout: the marker, every file's size and checksum. Megatron-LM: every file the storage metadata
    names, with its recorded size, and (without --step) that the tracker names a complete iteration.
    Exit 0 intact, CHECKPOINT_DAMAGED otherwise."""
    root = ck.resolve_root(directory)
    if megatron_lm.is_layout(root):
        chosen, problem = _verify_megatron_lm(root, step)
    else:
        chosen = ck.pick_step(root, step)
        problem = manifest.verify(layout.step_dir(root, chosen), checksums=not sizes_only)
    if as_json:
        print(json.dumps({"step": chosen, "ok": problem is None, "problem": problem}))
    else:
        print(f"step {chosen}: " + ("intact" if problem is None else f"DAMAGED: {problem}"))
    if problem is not None:
        raise typer.Exit(int(ExitCode.CHECKPOINT_DAMAGED))


def _verify_megatron_lm(root: Path, step: int | None) -> tuple[int | None, str | None]:
    if step is None:
        return megatron_lm.read_tracker(root), megatron_lm.tracker_problem(root)
    if step not in megatron_lm.iterations(root):
        raise CheckpointError(f"no iteration directory for {step} in {root}")
    return step, megatron_lm.check_iteration(megatron_lm.iteration_dir(root, step))


@ckpt_app.command("repair")
def repair_cmd(directory: Path) -> None:
    """Point a `latest` pointer (Megatron-LM: the tracker) that names a missing or incomplete checkpoint
    at the newest complete one, atomically; a pointer naming a complete checkpoint is left alone.
    Exit 0 when it names a complete checkpoint afterwards, CHECKPOINT_DAMAGED when none exists."""
    root = ck.resolve_root(directory)
    _, after, what = megatron_lm.repair(root) if megatron_lm.is_layout(root) else ck.repair(root)
    print(what)
    if after is None:
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
