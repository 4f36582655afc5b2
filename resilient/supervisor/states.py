"""The supervisor's activity states (its final states: `resilient.core.outcome.Outcome`)."""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    """What the supervisor is doing now (status.json `state`, the metrics state label)."""

    STARTING = "starting"
    PREFLIGHT = "preflight"
    WAITING = "waiting"
    """At the attempt barrier, for the other nodes."""
    RUNNING = "running"
    PREEMPTING = "preempting"
    """Stop requested; ranks save and exit."""
    STOPPING = "stopping"
    """Tearing the ranks down after a failure."""
    DECIDING = "deciding"
    BACKOFF = "backoff"
    STANDBY = "standby"
    """A spare node: warm standby ranks, continuous health checks, ready to take a failed node's place."""
    ELECTING = "electing"
    """The coordinator was lost: choosing the next one with the other survivors."""
