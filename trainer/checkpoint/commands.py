"""`resilient ckpt list|verify|repair|inspect|digest DIR`.

DIR is a run directory, its checkpoints/ directory, or a Megatron-LM save directory
(`latest_checkpointed_iteration.txt` + `iter_NNNNNNN/` or `release/`, and `non_persistent/`, in every
--ckpt-format); list, verify and repair understand both formats. Our format's seals (which run a
checkpoint belongs to) are checked with the secret of the run directory DIR is or sits in (`--run-dir`
names another); `adopt` seals checkpoints of before for their run, `clean` removes stale memory tiers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import typer

from resilient.core import secret
from resilient.core.errors import CheckpointError, ConfigError
from resilient.core.exit_codes import ExitCode
from resilient.core.secret import RunKey
from trainer.checkpoint import inspect as ck
from trainer.checkpoint import manifest, ondisk
from trainer.checkpoint.config import CheckpointConfig
from trainer.megatron_lm import checkpoints as megatron_lm

_RUN_DIR = typer.Option(
    None,
    "--run-dir",
    help="the run the checkpoints belong to (default: DIR, or the run "
    "directory DIR/.. when DIR is its checkpoints directory)",
)


def _run_key(directory: Path, root: Path, run_dir: Path | None) -> RunKey | None:
    """The key of the run whose checkpoints are under `root`, from its run directory's secret; None when
    no secret is found (seals are then not checked)."""
    for candidate in [run_dir] if run_dir is not None else dict.fromkeys([directory, root.parent]):
        found = secret.load(candidate)
        if found is not None:
            return RunKey(found)
    if run_dir is not None:
        raise ConfigError(f"{run_dir}: no run secret (.secret) in it")
    return None


ckpt_app = typer.Typer(
    help="Inspect, check and repair checkpoints (DIR: RUN_DIR, RUN_DIR/checkpoints or a Megatron-LM save directory).",
    no_args_is_help=True,
)


@ckpt_app.command("list")
def list_cmd(
    directory: Path,
    as_json: bool = typer.Option(False, "--json", help="JSON output"),
    memory_dir: Path | None = typer.Option(
        None, "--memory-dir", help="the run's memory tier (default: the one derived from RUN_DIR)"
    ),
) -> None:
    """Every step (iteration) directory, complete or not, and which one `latest` (the tracker) names, with the
    last step whose replica check agreed when it was saved; for a run directory also the memory tier: each
    node's own snapshots and the replicas it holds (checksums verified)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory")
    root = ck.resolve_root(directory)
    if megatron_lm.holds_checkpoints(root):
        with _readable(root):
            rows = megatron_lm.listing(root)
    else:
        rows = [{"tier": "disk", **row} for row in ck.listing(root)]
        from trainer.checkpoint.memory import stale

        key = _run_key(directory, root, None) if root != directory else None
        tier = memory_dir or (CheckpointConfig().memory_root(directory, key) if key is not None else None)
        if tier is not None and tier.is_dir():
            from trainer.checkpoint.memory.listing import listing as memory_listing  # torch: only for a tier

            rows += memory_listing(tier, key)
        rows += stale.stale_roots()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for row in rows:
        why = f"  ({row['problem']})" if row.get("problem") else ""
        if row.get("state") == "stale":
            print(
                f"{'-':>9}  {'stale':<10} {row['bytes']:>14,} B  memory tier {row['path']}{why}; "
                "`resilient ckpt clean` removes it"
            )
            continue
        latest = "  <- latest" if row.get("latest") else ""
        if row.get("last_agreeing_step") is not None:
            why = f"  replicas agreed at step {row['last_agreeing_step']}{why}"
        tier = row.get("tier", "disk")
        if tier.startswith("memory"):
            held = f" of node{row['of_node']}" if row["of_node"] is not None else ""
            tier = f"{tier} node{row['node']}{held} ranks {','.join(map(str, row['ranks']))}"
        if "format" in row:
            tier = f"{tier} {row['format']}"
        print(f"{row['step']:>9}  {row['state']:<10} {row['bytes']:>14,} B  {tier}{latest}{why}")


@ckpt_app.command("verify")
def verify_cmd(
    directory: Path,
    step: int | None = typer.Option(None, help="step (default: newest complete; Megatron-LM: what each tracker names)"),
    sizes_only: bool = typer.Option(False, "--sizes-only", help="skip checksums"),
    as_json: bool = typer.Option(False, "--json", help="JSON output"),
    run_dir: Path | None = _RUN_DIR,
) -> None:
    """Our format: the marker, every file's size and checksum. Megatron-LM: what each tracker (persistent,
    non_persistent/) names, in any --ckpt-format: every file the storage metadata names with its recorded
    size, the common state, every model-parallel rank's files, integrity.json's sha256 digests.
    Our format: the seal too, with the run's secret (another run's checkpoint, or one of before run seals,
    is refused). Exit 0 intact, CHECKPOINT_DAMAGED otherwise."""
    root = ck.resolve_root(directory)
    unsealed = ""
    if megatron_lm.holds_checkpoints(root):
        with _readable(root):
            checks = _verify_megatron_lm(root, step, checksums=not sizes_only)
    else:
        chosen = ck.pick_step(root, step)
        key = _run_key(directory, root, run_dir)
        unsealed = "" if key is not None else " (seal not checked: no run secret found; see --run-dir)"
        checks = [("disk", chosen, manifest.verify(ondisk.step_dir(root, chosen), checksums=not sizes_only, key=key))]
    problems = [problem for _, _, problem in checks if problem is not None]
    if as_json:
        tiers = [{"tier": tier, "step": at, "ok": problem is None, "problem": problem} for tier, at, problem in checks]
        print(
            json.dumps(
                {
                    "step": checks[0][1],
                    "ok": not problems,
                    "problem": problems[0] if problems else None,
                    **({"tiers": tiers} if len(checks) > 1 else {}),
                }
            )
        )
    else:
        for tier, at, problem in checks:
            verdict = "intact" + unsealed if problem is None else f"DAMAGED: {problem}"
            print(f"{_tier_prefix(tier)}step {at}: {verdict}")
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
    if megatron_lm.holds_checkpoints(root):
        with _readable(root):
            done = megatron_lm.repair(root)
    else:
        done = [("disk", *ck.repair(root))]
    for tier, _, _, what in done:
        print(_tier_prefix(tier) + what)
    if any(after is None for _, _, after, _ in done):
        raise typer.Exit(int(ExitCode.CHECKPOINT_DAMAGED))


@ckpt_app.command("adopt")
def adopt_cmd(
    directory: Path,
    step: int | None = typer.Option(None, help="step (default: every committed one)"),
    run_dir: Path | None = _RUN_DIR,
) -> None:
    """Seal checkpoints for the run they sit in after verifying them in full: how checkpoints written before
    run seals (or copied from another run on purpose) become loadable by this run. Exit CHECKPOINT_DAMAGED
    when one could not be adopted."""
    root = ck.resolve_root(directory)
    key = _run_key(directory, root, run_dir)
    if key is None:
        raise ConfigError(f"{directory}: no run secret found next to it; pass --run-dir RUN_DIR")
    steps = [step] if step is not None else ondisk.committed_steps(root)
    if step is not None and step not in ondisk.step_dirs(root):
        raise CheckpointError(f"no checkpoint directory for step {step} in {root}")
    done = ck.adopt(root, key, steps)
    for at, _, what in done:
        print(f"step {at}: {what}")
    if not all(ok for _, ok, _ in done):
        raise typer.Exit(int(ExitCode.CHECKPOINT_DAMAGED))


@ckpt_app.command("clean")
def clean_cmd(
    paths: list[Path] | None = typer.Argument(None, help="only these (default: every stale one)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="only say what would be removed"),
) -> None:
    """Remove this user's memory-tier directories in /dev/shm whose run is gone (its run directory deleted,
    re-created or moved, or the directory older than run records): what `ckpt list` reports as stale. A
    directory named that is not stale is left alone (exit CONFIG_ERROR)."""
    from trainer.checkpoint.memory import stale as memory

    stale = memory.stale_roots()
    if paths:
        named = {str(p.absolute()) for p in paths}
        live = named - {row["path"] for row in stale}
        if live:
            raise ConfigError(f"{sorted(live)[0]}: not a stale memory-tier directory of this user (left alone)")
        stale = [row for row in stale if row["path"] in named]
    for row in stale:
        if not dry_run:
            memory.remove(Path(row["path"]))
        print(f"{'would remove' if dry_run else 'removed'} {row['path']} ({row['bytes']:,} B): {row['problem']}")


@ckpt_app.command("inspect")
def inspect_cmd(
    directory: Path,
    step: int | None = typer.Option(None, help="step (default: newest complete)"),
    as_json: bool = typer.Option(False, "--json", help="JSON output"),
) -> None:
    """Step, consumed samples, model and parallel layout, bytes."""
    root = ck.resolve_root(directory)
    info = ck.inspect(root, ck.pick_step(root, step))
    if as_json:
        print(json.dumps(info, indent=1))
        return
    for key, value in info.items():
        print(f"{key:>17}: {value}")


@ckpt_app.command("digest")
def digest_cmd(directory: Path, step: int | None = typer.Option(None, help="step (default: newest complete)")) -> None:
    """One hex digest over model and optimizer tensors (last line of output)."""
    root = ck.resolve_root(directory)
    chosen = ck.pick_step(root, step)
    print(f"step {chosen}")
    print(ck.digest(ondisk.step_dir(root, chosen)))


def register(app: typer.Typer) -> None:
    """Add `resilient ckpt ...`."""
    app.add_typer(ckpt_app, name="ckpt")
