"""Fault schedules: when each fault fires, as a pure function of the spec, the fault list and the seed.

Specs:
  none                no faults (a reference run)
  mtbf:SECONDS        exponential gaps with this mean, measured in training time since the first step;
                      each fault kind drawn at random from the list
  steps:S1,S2,...     fault i fires once step S_i has completed; kinds cycle through the list in order
  times:T1,T2,...     fault i fires T_i seconds after the first step; kinds cycle through the list
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from resilient.core.errors import ConfigError

# Enough faults for any run a drill will watch; the runner stops at the end of the run.
MTBF_MAX_FAULTS = 10_000


@dataclass(frozen=True)
class Trigger:
    """Fire `fault` once the run has reached `at` (a step, or seconds after the first step)."""

    fault: str
    by: str
    """"step" or "time"."""
    at: float


def _numbers(body: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in body.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"chaos schedule: {what} must be comma-separated numbers, got {body!r}") from None
    if not values or any(v < 0 for v in values):
        raise ConfigError(f"chaos schedule: {what} needs at least one non-negative number, got {body!r}")
    return sorted(values)


def build_schedule(spec: str, faults: list[str], seed: int) -> list[Trigger]:
    """The triggers of `spec` for the fault kinds `faults` (validated by the caller), in firing order."""
    kind, _, body = spec.partition(":")
    if kind == "none" and not body:
        return []
    if not faults:
        raise ConfigError("chaos: --faults names no fault kind")
    if kind == "steps":
        return [Trigger(faults[i % len(faults)], "step", int(s)) for i, s in enumerate(_numbers(body, "steps"))]
    if kind == "times":
        return [Trigger(faults[i % len(faults)], "time", t) for i, t in enumerate(_numbers(body, "times"))]
    if kind == "mtbf":
        (mean,) = _numbers(body, "mtbf") if "," not in body else (None,)
        if not mean:
            raise ConfigError(f"chaos schedule: mtbf needs one positive number of seconds, got {body!r}")
        rng = random.Random(seed)
        at, out = 0.0, []
        for _ in range(MTBF_MAX_FAULTS):
            at += rng.expovariate(1.0 / mean)
            out.append(Trigger(rng.choice(faults), "time", round(at, 3)))
        return out
    raise ConfigError(f"chaos schedule: unknown spec {spec!r} (none, mtbf:SECONDS, steps:S1,S2,..., times:T1,...)")


def due(trigger: Trigger, *, step: int, training_seconds: float | None) -> bool:
    """Has the run reached the trigger? (`training_seconds` is None before the first step.)"""
    if trigger.by == "step":
        return step >= trigger.at
    return training_seconds is not None and training_seconds >= trigger.at
