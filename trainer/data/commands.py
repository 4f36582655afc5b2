"""`resilient data prepare CONFIG` and `resilient data inspect PATH`."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

data_app = typer.Typer(help="Prepare (pre-tokenize) and inspect C4-format training data.", no_args_is_help=True)


def _log_to_stderr() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


@data_app.command("prepare")
def prepare_cmd(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set data.path=/c4/en (repeatable)."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run directory (default: the config's run_dir)."),
    workers: int | None = typer.Option(
        None, "--workers", min=1, help="Tokenizing processes (default: data.prepare_workers)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON."),
) -> None:
    """Pre-tokenize the configured data into the cache (megatron .bin/.idx).

    Resumes the shards a previous prepare finished. The trainer prepares by itself when the cache
    is missing; run this ahead for large data sets."""
    from trainer.config import load_trainer_config
    from trainer.data.prepare import prepare_if_needed

    _log_to_stderr()
    cfg = load_trainer_config(config, set_)
    manifest_path = prepare_if_needed(cfg.data, run_dir or cfg.run_dir, workers)
    manifest = json.loads(manifest_path.read_text())
    keys = ("fingerprint", "documents", "tokens", "skipped_lines", "truncated_shards")
    summary = {"manifest": str(manifest_path), "shards": len(manifest["shards"]), **{k: manifest[k] for k in keys}}
    if as_json:
        print(json.dumps(summary, indent=1))
    else:
        print(
            f"{summary['shards']} shards, {summary['documents']:,} documents, {summary['tokens']:,} tokens, "
            f"{summary['skipped_lines']} malformed lines skipped, truncated shards: "
            f"{', '.join(summary['truncated_shards']) or 'none'}\nmanifest: {manifest_path}"
        )


@data_app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="A shard, a directory or glob of shards, or a directory of .bin/.idx."),
    as_json: bool = typer.Option(False, "--json", help="JSON output (totals and per shard)."),
    tokenizer: Path | None = typer.Option(None, "--tokenizer", help="tokenizer.json: also count tokens."),
) -> None:
    """Shards, documents, bytes, damaged lines/streams, and tokens when a tokenizer is given."""
    from trainer.data.inspect import inspect_data

    report = inspect_data(path, tokenizer)
    if as_json:
        print(json.dumps(report, indent=1))
        return

    def fmt(value: int | None) -> str:
        return "-" if value is None else f"{value:,}"

    print(f"{'shard':<44} {'documents':>11} {'file bytes':>14} {'text bytes':>14} {'tokens':>14} damage")
    for s in report["per_shard"]:
        damage = ", ".join(
            filter(
                None,
                [
                    f"{s['malformed_lines']} bad lines" if s["malformed_lines"] else "",
                    "truncated" if s["truncated"] else "",
                ],
            )
        )
        print(
            f"{s['name']:<44} {fmt(s['documents']):>11} {fmt(s['file_bytes']):>14} {fmt(s['text_bytes']):>14} "
            f"{fmt(s['tokens']):>14} {damage}"
        )
    print(
        f"{'total (' + str(report['shards']) + ' shards)':<44} {fmt(report['documents']):>11} "
        f"{fmt(report['file_bytes']):>14} {fmt(report['text_bytes']):>14} {fmt(report['tokens']):>14}"
    )


def register(app: typer.Typer) -> None:
    """Add this component's commands to the `resilient` app."""
    app.add_typer(data_app, name="data")
