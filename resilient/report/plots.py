"""The report's figures, each a base64 PNG (matplotlib, Agg: no display needed), or None without data."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
# Labels carry values from the run's files (attempt numbers, ranks): text is text, never mathtext to parse.
matplotlib.rcParams["text.parse_math"] = False
import matplotlib.pyplot as plt  # noqa: E402

from resilient.goodput import BADPUT_CATEGORIES, GoodputReport  # noqa: E402
from resilient.report.data import RunData, Span, attempt_spans, by_attempt, per_rank_step_times, timeline_marks  # noqa: E402

_BADPUT_COLOURS = dict(
    zip(BADPUT_CATEGORIES, ("#8c564b", "#ff7f0e", "#9467bd", "#d62728", "#7f7f7f", "#bcbd22"), strict=True)
)
_OUTCOME_COLOURS = {
    "failure": "#d62728",
    "restart": "#d62728",
    "finished": "#2ca02c",
    "preempted": "#ff7f0e",
    "gave_up": "#7f0000",
    "running": "#1f77b4",
}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _lines(ax: Any, series: dict[Any, tuple[list[int], list[float]]], label: str, style: str = "-") -> None:
    for attempt, (xs, ys) in series.items():
        ax.plot(xs, ys, style, lw=1.2, ms=3, label=f"{label} (attempt {attempt})" if len(series) > 1 else label)


def loss(data: RunData) -> str | None:
    train, val = by_attempt(data.train, "loss"), by_attempt(data.train, "val_loss")
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.6))
    _lines(ax, train, "loss")
    _lines(ax, val, "validation loss", "o--")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def throughput(data: RunData) -> str | None:
    tps, mfu = by_attempt(data.train, "tokens_per_s"), by_attempt(data.train, "mfu")
    if not tps and not mfu:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.2))
    _lines(a, tps, "tokens/s")
    a.set(xlabel="step", ylabel="tokens/s", title="Throughput")
    _lines(b, {k: (xs, [100 * y for y in ys]) for k, (xs, ys) in mfu.items()}, "MFU")
    b.set(xlabel="step", ylabel="MFU %", title="Model FLOPs utilisation")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return _png(fig)


def rank_step_times(data: RunData, t0: float) -> str | None:
    """Lines per rank up to 16 ranks; beyond, a rank x time heat map (a straggler is a bright row)."""
    per_rank = per_rank_step_times(data.rank_steps, t0)
    if not per_rank:
        return None
    fig, ax = plt.subplots(figsize=(11, 3.6))
    if len(per_rank) <= 16:
        for rank, (xs, ys) in per_rank.items():
            ax.plot(xs, ys, "-o", ms=2, lw=1, label=f"rank {rank}")
        ax.set(xlabel="hours since start", ylabel="step time (s)")
        ax.legend(fontsize=7, ncol=8)
        ax.grid(alpha=0.3)
    else:
        xs = sorted({x for xs_, _ in per_rank.values() for x in xs_})
        col = {x: i for i, x in enumerate(xs)}
        grid = [[float("nan")] * len(xs) for _ in per_rank]
        for row, (_, (rxs, rys)) in enumerate(per_rank.items()):
            for x, y in zip(rxs, rys, strict=True):
                grid[row][col[x]] = y
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        fig.colorbar(im, ax=ax, label="step time (s)")
        ax.set(xlabel="sample", ylabel="rank index")
    ax.set_title("Step time per rank")
    return _png(fig)


def timeline(data: RunData, t0: float, end: float) -> str | None:
    spans: list[Span] = attempt_spans(data.ledger, end)
    if not spans and not data.ledger:
        return None
    h = lambda ts: (ts - t0) / 3600  # noqa: E731
    fig, ax = plt.subplots(figsize=(11, 2.8))
    for s in spans:
        ax.broken_barh(
            [(h(s.start), max(h(s.end) - h(s.start), 1e-4))],
            (2.6, 0.8),
            color=_OUTCOME_COLOURS.get(s.outcome, "#1f77b4"),
            alpha=0.8,
        )
        ax.text(h(s.start), 3.5, f"a{s.attempt}", fontsize=7)
    styles = (("|", "#2ca02c"), ("x", "#d62728"), ("D", "#7f0000"), ("v", "#ff7f0e"))
    marks = timeline_marks(data.ledger)
    ys = [2.2 - 0.55 * i for i in range(len(marks))]
    for times, (marker, colour), y in zip(marks.values(), styles, ys, strict=True):
        xs = [h(ts) for ts in times]
        ax.plot(xs, [y] * len(xs), marker, color=colour, ms=9 if marker != "D" else 6, mew=2, ls="none")
    ax.set_yticks([3.0, *ys], ["attempts", *marks])
    ax.set(xlabel="hours since start", ylim=(0, 4), title="Timeline")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def goodput_waterfall(report: GoodputReport) -> str | None:
    """Wall time, each badput category taken off it, productive time left."""
    if report.wall_seconds <= 0:
        return None
    wall = report.wall_seconds
    unit, scale = ("h", 3600) if wall >= 7200 else ("min", 60) if wall >= 120 else ("s", 1)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    top = report.wall_seconds
    ax.bar(0, top / scale, color="#1f77b4")
    for i, cat in enumerate(BADPUT_CATEGORIES, start=1):
        v = report.badput_seconds.get(cat, 0.0)
        ax.bar(i, v / scale, bottom=(top - v) / scale, color=_BADPUT_COLOURS[cat])
        ax.text(i, top / scale, f"{v / scale:.2f}", ha="center", va="bottom", fontsize=8)
        top -= v
    ax.bar(len(BADPUT_CATEGORIES) + 1, report.productive_seconds / scale, color="#2ca02c")
    ax.set_xticks(
        range(len(BADPUT_CATEGORIES) + 2),
        ["wall", *(c.replace("_", "\n") for c in BADPUT_CATEGORIES), "productive"],
        fontsize=8,
    )
    ax.set(ylabel=unit, title=f"Goodput {report.ratio:.1%}: where the wall time went")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)
