"""Progress bars for long operations (`data prepare`, `ckpt verify`): drawn on stderr only when it is a
terminal, so ranks, logs, pipes and tests see a plain loop."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(
    items: Iterable[T], description: str, *, total: float | None = None, weight: Callable[[T], float] | None = None
) -> Iterator[T]:
    """Yield `items`, advancing a bar by 1 (or by `weight(item)`, e.g. bytes) after each one."""
    if not sys.stderr.isatty():
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        *([] if weight else [MofNCompleteColumn()]),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task, weight(item) if weight else 1)
