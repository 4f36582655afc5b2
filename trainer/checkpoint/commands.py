"""`resilient ckpt list|verify|inspect|digest DIR`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from resilient.core.exit_codes import ExitCode
from trainer.checkpoint import inspect as ck
from trainer.checkpoint import layout, manifest

ckpt_app = typer.Typer(help="Inspect and check checkpoints (DIR is RUN_DIR or RUN_DIR/checkpoints).",
                       no_args_is_help=True)


@ckpt_app.command("list")
def list_cmd(directory: Path, as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Every step directory, complete or not, and which one `latest` names."""
    rows = ck.listing(ck.resolve_root(directory))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        print(f"{row['step']:>9}  {row['state']:<10} {row['bytes']:>14,} B{'  <- latest' if row['latest'] else ''}")


@ckpt_app.command("verify")
def verify_cmd(directory: Path, step: Optional[int] = typer.Option(None, help="step (default: newest complete)"),
               sizes_only: bool = typer.Option(False, "--sizes-only", help="skip checksums"),
               as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Check the marker, every file's size and checksum. Exit 0 intact, CHECKPOINT_DAMAGED otherwise."""
    root = ck.resolve_root(directory)
    chosen = ck.pick_step(root, step)
    problem = manifest.verify(layout.step_dir(root, chosen), checksums=not sizes_only)
    if as_json:
        print(json.dumps({"step": chosen, "ok": problem is None, "problem": problem}))
    else:
        print(f"step {chosen}: " + ("intact" if problem is None else f"DAMAGED: {problem}"))
    if problem is not None:
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
