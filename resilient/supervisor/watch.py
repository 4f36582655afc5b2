"""Watching one attempt on one node, as a state machine: the pure part of `Supervisor._watch`.

Each poll the daemon gathers what it saw (`Seen`) and asks `advance` for the next state and the move to
carry out (signals, incident capture, teardown stay in the daemon):

    TRAINING --stop asked-------------> STOPPING   (BEGIN_STOP: the ranks are asked to save and exit)
    TRAINING --failure here or a peer's restart request--> ended: FAILED
    TRAINING --every rank exited 0----> ended: FINISHED
    TRAINING --every rank said done---> DRAINING   (a rank lingering in teardown gets `done_grace_s`)
    DRAINING --a rank not done--------> TRAINING
    DRAINING --grace over-------------> ended: FINISHED, after stopping the rest (FINISH_STOPPING_REST)
    DRAINING: otherwise as TRAINING (a stop, a failure or a clean exit of every rank ends it first)
    STOPPING --every rank exited------> ended: PREEMPTED
    STOPPING --deadline passed--------> ended: PREEMPTED, after killing the rest (PREEMPT_KILLING_REST)

A stop wins over a failure seen in the same poll (the ranks save what they have), a failure over a
finish, a finish over draining.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Mode(enum.StrEnum):
    TRAINING = "training"
    """The ranks train: stops, failures and finishes are looked for."""
    DRAINING = "draining"
    """Every rank reported done; the ones still running get a grace to exit."""
    STOPPING = "stopping"
    """A stop was asked: the ranks save and exit until a deadline."""


class Move(enum.StrEnum):
    """What the daemon does after a poll."""

    KEEP = "keep"
    """Nothing ended: poll again."""
    BEGIN_STOP = "begin_stop"
    """Ask the ranks to save and exit (the stop reason is the daemon's)."""
    PREEMPTED = "preempted"
    """Every rank stopped after the stop request: the attempt ends PREEMPTED."""
    PREEMPT_KILLING_REST = "preempt_killing_rest"
    """The stop deadline passed: kill the ranks still running; the attempt ends PREEMPTED."""
    FAILED = "failed"
    """A failure here or another node's restart request: capture evidence, the attempt ends FAILED."""
    FINISHED = "finished"
    """Every rank exited 0."""
    FINISH_STOPPING_REST = "finish_stopping_rest"
    """Every rank said done and the grace is over: stop the lingering ones; the attempt ends FINISHED."""


@dataclass(frozen=True)
class Seen:
    """One poll's observations (the daemon gathers them in priority order and may leave later ones unset)."""

    stop: bool = False
    """A stop was asked: a signal, a rank that exited PREEMPTED, a storage fault, the store's stop request."""
    failed: bool = False
    """A failure on this node, or another node's restart request."""
    all_exited: bool = False
    all_succeeded: bool = False
    """Every rank exited 0."""
    all_done: bool = False
    """Every rank exited 0 or reported `done`."""


@dataclass(frozen=True)
class Watch:
    mode: Mode = Mode.TRAINING
    until: float | None = None
    """STOPPING: the stop deadline; DRAINING: the end of the done grace."""


def advance(w: Watch, seen: Seen, now: float, *, stop_grace_s: float, done_grace_s: float) -> tuple[Watch, Move]:
    """The next state and the move to make, given what this poll saw."""
    if w.mode is Mode.STOPPING:
        assert w.until is not None
        if seen.all_exited:
            return w, Move.PREEMPTED
        return w, Move.PREEMPT_KILLING_REST if now > w.until else Move.KEEP
    if seen.stop:
        return Watch(Mode.STOPPING, now + stop_grace_s), Move.BEGIN_STOP
    if seen.failed:
        return w, Move.FAILED
    if seen.all_succeeded:
        return w, Move.FINISHED
    if not seen.all_done:
        return Watch(), Move.KEEP
    if w.mode is Mode.DRAINING:
        assert w.until is not None
        return w, Move.FINISH_STOPPING_REST if now > w.until else Move.KEEP
    return Watch(Mode.DRAINING, now + done_grace_s), Move.KEEP
