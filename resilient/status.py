"""RUN_DIR/status.json: the supervisor's view of the run, written atomically; `resilient status` renders it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from resilient.core import ledger
from resilient.core.atomic import atomic_write
from resilient.core.errors import ConfigError
from resilient.goodput import GoodputReport, compute_goodput
from resilient.core.rundir import RunDir



def write_status(run_dir: str | Path, status: dict[str, Any]) -> None:
    """Replace RUN_DIR/status.json atomically (temp file + rename), owner-only."""
    atomic_write(RunDir(run_dir).status, json.dumps({**status, "written_at": time.time()}, indent=1, default=str),
                 durable=False)  # rewritten every few seconds; a lost update after a crash is harmless


def read_status(run_dir: str | Path) -> dict[str, Any]:
    path = RunDir(run_dir).status
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no status.json in {run_dir} (no supervisor has run there)") from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None


def _age(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{max(0.0, now - ts):.1f}s"


def render_status(status: dict[str, Any], console: Console, now: float | None = None) -> None:
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
                      f"step {failure.get('step')}: {failure.get('reason')}")
    table = Table("rank", "node", "pid", "phase", "step", "heartbeat age")
    for r in status.get("ranks", []):
        table.add_row(str(r.get("rank")), str(r.get("node_name", r.get("node"))), str(r.get("pid")),
                      str(r.get("phase")), str(r.get("step")), _age(r.get("last_heartbeat"), now))
    console.print(table)


def run_goodput(run_dir: str | Path, now: float | None = None) -> GoodputReport:
    """Goodput of a run directory from its ledger and train log, at `now` (default: the clock)."""
    return compute_goodput(list(ledger.read(run_dir)), list(ledger.read_jsonl(RunDir(run_dir).train_log)),
                           time.time() if now is None else now)
