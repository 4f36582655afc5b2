"""RUN_DIR/status.json: the supervisor's view of the run, written atomically; `resilient status` renders it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from resilient import ledger
from resilient.atomic import atomic_write
from resilient.errors import ConfigError
from resilient.goodput import GoodputReport, compute_goodput

STATUS_NAME = "status.json"


def write_status(run_dir: str | Path, status: dict[str, Any]) -> None:
    """Replace RUN_DIR/status.json atomically (temp file + rename), owner-only."""
    atomic_write(Path(run_dir) / STATUS_NAME, json.dumps({**status, "written_at": time.time()}, indent=1, default=str),
                 durable=False)  # rewritten every few seconds; a lost update after a crash is harmless


def read_status(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / STATUS_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no {STATUS_NAME} in {run_dir} (no supervisor has run there)") from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None


def _age(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{max(0.0, now - ts):.1f}s"


def render_status(status: dict[str, Any], console: Console, now: float | None = None,
                  run_dir: str | Path = ".") -> None:
    """Print the status as a summary line, a failure line and a per-rank table."""
    now = time.time() if now is None else now
    ports = ", ".join(f"{n}:{p}" for n, p in (status.get("metrics_ports") or {}).items() if p) or "-"
    console.print(
        f"[bold]{status.get('state', '?')}[/bold]  attempt {status.get('attempt')}  step {status.get('step')}  "
        f"last checkpoint {status.get('last_checkpoint')}  restarts {status.get('restarts', 0)}  "
        f"metrics {ports}  (updated {_age(status.get('written_at'), now)} ago)"
    )
    failure = status.get("last_failure")
    if failure:
        console.print(f"last failure: {failure.get('kind')} rank {failure.get('rank')} node {failure.get('node')} "
                      f"step {failure.get('step')}: {failure.get('reason')}", markup=False)
    incident = last_incident(run_dir)
    if failure and incident:
        console.print(f"incident: {render_incident(run_dir, incident)}", markup=False)
    table = Table("rank", "node", "pid", "phase", "step", "heartbeat age")
    for r in status.get("ranks", []):
        table.add_row(str(r.get("rank")), str(r.get("node_name", r.get("node"))), str(r.get("pid")),
                      str(r.get("phase")), str(r.get("step")), _age(r.get("last_heartbeat"), now))
    console.print(table)


def last_incident(run_dir: str | Path) -> str | None:
    """The incident directory of the ledger's last failure (the coordination store's copy of a failure,
    which status.json shows, does not carry it)."""
    failures = [e for e in ledger.read(run_dir) if e.get("event") == "failure"]
    return failures[-1].get("incident") if failures else None


def render_incident(run_dir: str | Path, incident: str) -> str:
    """One line: where the incident's evidence is and whom its summary blames."""
    where = Path(run_dir) / incident
    try:
        culprit = json.loads((where / "summary.json").read_text())["culprit"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{where} (no readable summary)"
    return f"{where}: culprit rank {culprit.get('rank')} at {culprit.get('frame') or '?'} ({culprit.get('reason')})"


def run_goodput(run_dir: str | Path, now: float | None = None) -> GoodputReport:
    """Goodput of a run directory from its ledger and train log, at `now` (default: the clock)."""
    return compute_goodput(list(ledger.read(run_dir)), list(ledger.read_jsonl(Path(run_dir) / "train_log.jsonl")),
                           time.time() if now is None else now)
