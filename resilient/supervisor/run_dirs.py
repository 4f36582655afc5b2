"""The run's directories (run dir, checkpoint root) as the supervisor found them at its start.

One that vanishes or is replaced while the run uses it is a storage fault: never written to, never
loaded from (a replaced run dir is fenced: ledger and status are written to it no more). One made
shared with other users since the start stops the run unless `supervisor.allow_shared_dir` is set.
"""

from __future__ import annotations

from pathlib import Path

from resilient.core import guarded, permissions

_CHECK_EVERY_S = 1.0
"""How often a running attempt stats its directories (two stat calls: nothing next to a step)."""


class RunDirs:
    def __init__(self, run_dir: Path, paths: list[Path]) -> None:
        self.run_dir = run_dir
        self.ids = permissions.capture(paths)
        self._checked = 0.0

    def changed(self) -> str | None:
        """Why a directory vanished or was replaced, or None."""
        changed = permissions.changed_dirs(self.ids)
        if changed is None:
            return None
        path, reason = changed
        if path == self.run_dir:
            guarded.fence(self.run_dir, reason)
        return reason

    def changed_now(self, now: float) -> str | None:
        """`changed()`, at most once per second of `now`."""
        if now - self._checked < _CHECK_EVERY_S:
            return None
        self._checked = now
        return self.changed()

    def shared(self) -> str | None:
        """Why a directory (or the path to it) is no longer this user's alone, or None."""
        for path in self.ids:
            if problem := permissions.path_problem(path):
                return f"{problem}; refusing to go on (fix its owner/mode, or set supervisor.allow_shared_dir)"
        return None
