"""Stop requests: a signal sets a local flag; the ranks agree on it at the step boundary.

The supervisor sends the rank's stop signal (and Slurm sends SIGTERM or the batch `--signal` to every
process of the step); the handler only sets a flag, so a signal at any moment is safe. A rank then
combines the flags of all ranks in one collective per step (the own trainer folds it into its loss
all-reduce), so every rank stops after the same step and saves the same checkpoint (Megatron's
signal-handler idea).
"""

from __future__ import annotations

import signal

from resilient.rank.env import RankEnv


class StopFlag:
    """Set by a stop signal; read at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def install(self, env: RankEnv | None = None) -> StopFlag:
        """Handle every stop signal the rank environment names (the supervisor's stop request and the
        scheduler's preemption signal, which srun forwards to every process of the step)."""
        for name in (env or RankEnv.from_environ()).stop_signals:
            signal.signal(signal.Signals[name], self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
