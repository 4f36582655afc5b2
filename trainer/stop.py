"""Stop requests: a signal sets a local flag; the ranks agree on it at the step boundary.

The supervisor sends SIGUSR1 (and Slurm sends SIGTERM or the `--signal` to every process of the
step); the handler only sets a flag, so a signal at any moment is safe. The training step sums the
flags over all ranks in its loss all-reduce, so every rank stops after the same step and saves the
same checkpoint (Megatron's signal-handler idea).
"""

from __future__ import annotations

import signal


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Set by a stop signal; read at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def install(self, preempt_signal: str | None = None) -> "StopFlag":
        """Handle SIGUSR1, SIGTERM and the configured preemption signal: srun forwards a batch
        script's `--signal` to every process of the step, ranks included."""
        extra = (signal.Signals[preempt_signal],) if preempt_signal else ()
        for sig in (*STOP_SIGNALS, *extra):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

