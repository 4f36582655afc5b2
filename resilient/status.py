"""RUN_DIR/status.json: the supervisor's view of the run, written atomically; `resilient status` renders it.

`resilient status` must answer at once: this module imports nothing heavy (no torch, no pydantic
config, no supervisor); the run's end states come from the core.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from resilient.core import guarded, ledger
from resilient.core.atomic import atomic_write
from resilient.core.errors import ConfigError
from resilient.core.events import LedgerEvent
from resilient.core.outcome import ENDED_STATES
from resilient.core.rundir import RunDir
from resilient.goodput import GoodputReport, compute_goodput
from resilient.goodput import render as render_goodput


def write_status(run_dir: str | Path, status: dict[str, Any]) -> None:
    """Replace RUN_DIR/status.json atomically (temp file + rename), owner-only. A full filesystem is
    reported once and survived; the next status that gets written names the files that could not be."""
    path = RunDir(run_dir).status
    failed = guarded.failures()
    payload = {**status, "written_at": time.time(), **({"storage_errors": failed} if failed else {})}
    # Compact: json's C encoder writes 8192 ranks in milliseconds, its indenting Python encoder does not.
    guarded.write(
        path, lambda: atomic_write(path, json.dumps(payload, default=str), durable=False)
    )  # rewritten every few seconds; a lost update is harmless


def read_status(run_dir: str | Path) -> dict[str, Any]:
    path = RunDir(run_dir).status
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no status.json in {run_dir} (no supervisor has run there)") from None
    except (ValueError, OSError) as err:
        raise ConfigError(f"{path}: unreadable ({err})") from None


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: Any) -> str:
    """`value` as text with every control character spelled out (\\x1b...): what status.json holds came
    from ranks and failure reasons, and must not move the cursor or recolour the operator's terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def _line(text: str, style: str = "") -> Text:
    """A line of the view: literal text (no console markup), control characters spelled out."""
    return Text(printable(text), style=style)


def _age(ts: Any, now: float) -> str:
    try:
        return "-" if ts is None else f"{max(0.0, now - float(ts)):.1f}s"
    except (TypeError, ValueError):
        return "?"


def _origin(record: dict[str, Any]) -> str:
    return f" (from {record['host']}, supervisor pid {record.get('pid')})" if record.get("host") else ""


def _memory(status: dict[str, Any]) -> str:
    step = status.get("last_memory_snapshot")
    return f" (memory {step})" if step is not None else ""


def _warm_of(spares: dict[str, Any]) -> str:
    """ ", 1 importing" where some of a node's spares have not finished their imports yet."""
    count, warm = spares.get("count"), spares.get("warm")
    return f", {count - warm} importing" if isinstance(count, int) and isinstance(warm, int) and warm < count else ""


def _mapping(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _renderable(status: dict[str, Any], now: float, run_dir: str | Path, incident: str | None) -> Group:
    ports = ", ".join(f"{n}:{p}" for n, p in _mapping(status.get("metrics_ports")).items() if p) or "-"
    head = Text.assemble(
        _line(str(status.get("state", "?")), "bold"),
        _line(
            f"  attempt {status.get('attempt')}  step {status.get('step')}  "
            f"last checkpoint {status.get('last_checkpoint')}{_memory(status)}  restarts "
            f"{status.get('restarts', 0)}  metrics {ports}  (updated "
            f"{_age(status.get('written_at'), now)} ago)"
        ),
    )
    parts: list[Any] = [head]
    failure = _mapping(status.get("last_failure"))
    if failure:
        parts.append(
            _line(
                f"last failure: {failure.get('kind')} rank {failure.get('rank')} node {failure.get('node')} "
                f"step {failure.get('step')}: {failure.get('reason')}{_origin(failure)}"
            )
        )
        if incident:
            parts.append(_line(f"incident: {render_incident(run_dir, incident)}"))
    stop = _mapping(status.get("stop"))
    if stop:  # authenticated by the run's secret: who really asked
        parts.append(_line(f"stop requested by node {stop.get('node')}: {stop.get('reason')}{_origin(stop)}"))
    for path, err in _mapping(status.get("storage_errors")).items():
        err = _mapping(err)
        parts.append(_line(f"storage: {err.get('lost_writes')} write(s) of {path} lost ({err.get('error')})"))
    spares = {n: _mapping(s) for n, s in _mapping(status.get("spares")).items() if s}
    if spares:  # warm standby ranks per node and what they cost
        parts.append(
            _line(
                "warm spares: "
                + ", ".join(
                    f"{n} {s.get('count')}{_warm_of(s)} ({(s.get('rss_bytes') or 0) / 2**30:.2f} GiB)"
                    for n, s in spares.items()
                )
            )
        )
    roster = _mapping(status.get("roster"))
    if roster and (roster.get("spares") or roster.get("out") or roster.get("epoch")):  # spare nodes in use
        spare = ", ".join(map(str, roster.get("spares") or [])) or "none left"
        nodes = " ".join(map(str, roster.get("nodes") or []))
        parts.append(
            _line(
                f"nodes: {nodes} (coordinator {roster.get('coordinator')}, "
                f"epoch {roster.get('epoch')}); spare nodes: {spare}"
            )
        )
    for host, bad in _mapping(status.get("bad_nodes")).items():  # the run's bad-node ledger
        bad = _mapping(bad)
        by = f", replaced by {bad['replaced_by']}" if bad.get("replaced_by") else ""
        parts.append(
            _line(
                f"bad node {host}: {bad.get('kind')} x{bad.get('count')} "
                f"(last {_age(bad.get('last_ts'), now)} ago{by}): {bad.get('reason')}"
            )
        )
    table = Table("rank", "node", "pid", "phase", "step", "heartbeat age")
    for r in status.get("ranks") or []:
        r = _mapping(r)
        table.add_row(
            *(
                _line(str(v))
                for v in (
                    r.get("rank"),
                    r.get("node_name", r.get("node")),
                    r.get("pid"),
                    r.get("phase"),
                    r.get("step"),
                    _age(r.get("last_heartbeat"), now),
                )
            )
        )
    parts.append(table)
    return Group(*parts)


def render_status(
    status: dict[str, Any],
    console: Console,
    now: float | None = None,
    run_dir: str | Path = ".",
    incident: str | None = None,
) -> None:
    """Print the status as a summary line, a failure line (and its incident) and a per-rank table."""
    console.print(_renderable(status, time.time() if now is None else now, run_dir, incident))


def last_incident(records: list[dict[str, Any]]) -> str | None:
    """The incident directory of the ledger's last failure (the coordination store's copy of a failure,
    which status.json shows, does not carry it)."""
    failures = [e for e in records if e.get("event") == LedgerEvent.FAILURE]
    return failures[-1].get("incident") if failures else None


def render_incident(run_dir: str | Path, incident: str) -> str:
    """One line: where the incident's evidence is and whom its summary blames."""
    where = Path(run_dir) / incident
    try:
        culprit = json.loads((where / "summary.json").read_text())["culprit"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{where} (no readable summary)"
    return f"{where}: culprit rank {culprit.get('rank')} at {culprit.get('frame') or '?'} ({culprit.get('reason')})"


def run_goodput(
    run_dir: str | Path, now: float | None = None, records: list[dict[str, Any]] | None = None
) -> GoodputReport:
    """Goodput of a run directory from its ledger and train log, at `now` (default: the clock)."""
    records = list(ledger.read(run_dir)) if records is None else records
    return compute_goodput(
        records, list(ledger.read_jsonl(RunDir(run_dir).train_log)), time.time() if now is None else now
    )


class StatusView:
    """Everything `resilient status` shows, read once from the run directory."""

    def __init__(self, run_dir: Path) -> None:
        from resilient.slurm.jobs import job_state  # light: subprocess only

        self.run_dir = run_dir
        self.data = read_status(run_dir)
        records = list(ledger.read(run_dir))
        ended = self.data.get("state") in ENDED_STATES  # an ended run stops accruing wall time at its last update
        self.goodput = run_goodput(run_dir, now=self.data.get("written_at") if ended else None, records=records)
        self.incident = last_incident(records)
        job_id = next(
            (str(r.get("job_id")) for r in reversed(records) if r.get("event") == LedgerEvent.SUBMITTED), None
        )
        self.slurm = {"job_id": job_id, "state": job_state(job_id)} if job_id else None

    def as_json(self) -> str:
        g = self.goodput
        return json.dumps(
            {
                **self.data,
                "goodput": {
                    "ratio": g.ratio,
                    "wall_seconds": g.wall_seconds,
                    "productive_seconds": g.productive_seconds,
                    "badput_seconds": g.badput_seconds,
                },
                "slurm": self.slurm,
                "incident": self.incident,
            }
        )  # compact: C encoder

    def renderable(self) -> Group:
        parts: list[Any] = [_renderable(self.data, time.time(), self.run_dir, self.incident)]
        if self.slurm:
            parts.append(_line(f"slurm job {self.slurm['job_id']}: {self.slurm['state'] or 'not known to Slurm'}"))
        parts.append(Text(render_goodput(self.goodput)))
        return Group(*parts)


def register(app: Any) -> None:
    import typer

    @app.command("status")
    def status(
        run_dir: Path = typer.Argument(..., help="Run directory."),
        as_json: bool = typer.Option(False, "--json", help="Print status.json as JSON."),
        watch: bool = typer.Option(False, "--watch", help="Refresh in place until interrupted."),
        interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between refreshes."),
    ) -> None:
        """Show a run's state, attempt, step, checkpoint, ranks and last failure (from RUN_DIR/status.json)."""
        if as_json:
            typer.echo(StatusView(run_dir).as_json())
            return
        console = Console()
        if not watch:
            console.print(StatusView(run_dir).renderable())
            return
        from rich.live import Live

        with Live(StatusView(run_dir).renderable(), console=console, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(StatusView(run_dir).renderable(), refresh=True)
            except KeyboardInterrupt:
                pass
