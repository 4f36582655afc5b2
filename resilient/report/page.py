"""The report as one self-contained HTML page: figures inlined as base64 PNG, no external assets."""

from __future__ import annotations

import datetime as dt
import html
import os
import time
from pathlib import Path
from typing import Any

from resilient.core.events import LedgerEvent
from resilient.core.outcome import ENDED_STATES
from resilient.goodput import compute_goodput
from resilient.goodput import render as render_goodput
from resilient.report import plots
from resilient.report.data import RunData, events, start_time

# The events table: everything but the per-checkpoint and per-rank records the figures already show.
_EVENTS = tuple(
    e for e in LedgerEvent if e not in (LedgerEvent.CKPT_SAVE, LedgerEvent.CKPT_LOAD, LedgerEvent.RANK_INIT)
)
_CSS = """body{font-family:sans-serif;margin:24px;color:#222;background:#fff}h1{font-size:22px}
h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}img{max-width:100%}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
tr.failure td{background:#fde8e8}.muted{color:#777}pre{background:#f4f4f4;padding:8px}"""


def _e(value: Any) -> str:
    """Every value from the run's files goes into the page through here: text, never markup."""
    return html.escape(str(value))


def _when(ts: Any) -> str:
    try:
        return dt.datetime.fromtimestamp(float(ts), dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return _e(ts)


def _figure(title: str, png: str | None, missing: str) -> str:
    body = (
        f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
        if png
        else f'<p class="muted">{html.escape(missing)}</p>'
    )
    return f"<h2>{html.escape(title)}</h2>\n{body}\n"


def _detail(e: dict[str, Any], link_base: str) -> str:
    skip = {"ts", "event", "incident"}
    text = _e(
        ", ".join(
            f"{k}={v}" for k, v in sorted(e.items(), key=lambda kv: str(kv[0])) if k not in skip and v is not None
        )
    )
    if e.get("incident"):
        href = _e(f"{link_base}/{e['incident']}/summary.txt")
        text += f' — <a href="{href}">incident {_e(e["incident"])}</a>'
    return text


def render(data: RunData, out: Path, now: float | None = None) -> str:
    """The page for `data`; links to incident directories are relative to where `out` is written."""
    status = data.status or {}
    end = status.get("written_at") if status.get("state") in ENDED_STATES else None
    now = end or now or time.time()
    t0 = start_time(data)
    goodput = compute_goodput(data.ledger, data.train, now)
    link_base = os.path.relpath(data.run_dir.resolve(), out.resolve().parent)
    failures = events(data.ledger, LedgerEvent.FAILURE)
    attempts = len({str(e.get("attempt")) for e in events(data.ledger, LedgerEvent.ATTEMPT_START)})
    head = (
        f"state <b>{_e(status.get('state', '?'))}</b>, step {_e(status.get('step', '?'))}, "
        f"attempts {attempts}, faults {len(failures)}, started {_when(t0) if t0 else '?'} UTC"
    )
    rows = "\n".join(
        f'<tr class="{_e(e["event"])}"><td>{_when(e.get("ts"))}</td><td>{_e(e["event"])}'
        f"</td><td>{_detail(e, link_base)}</td></tr>"
        for e in events(data.ledger, *_EVENTS)
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>resilient report: {_e(data.run_dir)}"
        f"</title><style>{_CSS}</style></head><body>",
        f"<h1>Run report: {_e(data.run_dir)}</h1><p>{head}</p>",
        f"<pre>{_e(render_goodput(goodput))}</pre>",
        _figure("Loss and validation loss", plots.loss(data), "no loss in train_log.jsonl yet"),
        _figure("Throughput and MFU", plots.throughput(data), "no step records in train_log.jsonl yet"),
        _figure(
            "Step time per rank (stragglers)",
            plots.rank_step_times(data, t0),
            "no per-rank step times (rank_steps.jsonl) yet",
        ),
        _figure("Attempts, faults, checkpoints, requeues", plots.timeline(data, t0, now), "empty ledger"),
        _figure("Goodput waterfall", plots.goodput_waterfall(goodput), "the run has not started"),
        f"<h2>Events</h2><table><tr><th>UTC</th><th>event</th><th>details</th></tr>\n{rows}</table>",
        f"<p class='muted'>generated {_when(time.time())} UTC by resilient report</p></body></html>",
    ]
    return "\n".join(parts)
