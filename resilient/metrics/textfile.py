"""The node's facts that must outlive its supervisor, in node_exporter's textfile-collector format.

A supervisor that finds its node unhealthy stops within a second, long before a Prometheus scraping
every 15 s reads its /metrics again; under Slurm the requeued job then runs on other nodes. So the
facts an operator is alerted on are also written to `metrics.textfile_dir/resilient_<node>.prom`:
the directory node_exporter's textfile collector serves (`--collector.textfile.directory`). That
exporter lives as long as the node, so Prometheus reads the facts after the supervisor is gone.

Facts, each labelled `node`:
  resilient_node_health_verdict{verdict, check, reason} 1    the node's last health verdict
  resilient_node_health_verdict_timestamp_seconds            when the node reached it
  resilient_gpu_last_xid, resilient_gpu_ecc_uncorrectable_errors, resilient_gpu_lost,
  resilient_gpu_row_remap_failed {gpu}                       the GPU readings of that verdict's report
  resilient_supervisor_exit_code{outcome, reason}            why the node's last supervisor exited
  resilient_supervisor_exit_timestamp_seconds

The file is rewritten only when a fact changes (a healthy run writes it once per start), replaced
atomically (node_exporter reads the old facts or the new, never half), and not fsynced: the path to
the next attempt waits for no disk. A new supervisor or `resilient health check` on the node keeps the
previous supervisor's exit until its own, and its first verdict replaces the node's last one.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from health.actions import HealthVerdict
from resilient.core.atomic import atomic_write
from resilient.core.errors import ConfigError
from resilient.core.exit_codes import ExitCode

GPU_FACTS = {
    # key in a health report's per-GPU values -> (metric, help): the same names as the live exporter's
    "last_xid": ("resilient_gpu_last_xid", "Latest XID error code seen (0: none), at the node's last verdict"),
    "ecc_uncorrectable": (
        "resilient_gpu_ecc_uncorrectable_errors",
        "Uncorrectable ECC errors since the driver loaded, at the node's last verdict",
    ),
    "lost": ("resilient_gpu_lost", "1 if the GPU fell off the bus or NVML lost it, at the node's last verdict"),
    "remap_failed": ("resilient_gpu_row_remap_failed", "1 if a row remap failed, at the node's last verdict"),
}
REASON_MAX = 256
"""Characters of a reason kept in a label (a verdict names every failing check and GPU)."""

# node_exporter runs as its own user: the file must be readable by it. It holds only what Prometheus publishes.
_MODE = 0o644


def textfile_name(node: str) -> str:
    """`resilient_<node>.prom`, the node name reduced to characters safe in a file name."""
    return f"resilient_{re.sub(r'[^A-Za-z0-9_.-]', '_', node)}.prom"


@dataclass(frozen=True)
class _Verdict:
    verdict: HealthVerdict
    gpus: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]
    ts: float

    def same_facts(self, other: _Verdict) -> bool:
        return (self.verdict.verdict, self.verdict.checks, self.gpus) == (
            other.verdict.verdict,
            other.verdict.checks,
            other.gpus,
        )


class NodeFacts:
    """The durable facts of one node, written to `directory` (None: nowhere)."""

    def __init__(self, directory: Path | None, node: str, *, clock: Callable[[], float] = time.time) -> None:
        self.directory, self.node, self._clock = directory, node, clock
        self.path = None if directory is None else Path(directory) / textfile_name(node)
        self._verdict: _Verdict | None = None
        self._exit = None if self.path is None else _previous_exit(self.path)
        self._errors_told: set[int] = set()

    def check(self) -> None:
        """A configured directory must exist and be writable (one line naming it otherwise): checked by the
        commands that write here before anything else they do."""
        if self.directory is None:
            return
        d, why = Path(self.directory), None
        if not d.is_dir():
            why = "not a directory (create it, or point it at node_exporter's --collector.textfile.directory)"
        elif not os.access(d, os.W_OK | os.X_OK):
            why = "not writable by this user"
        if why:
            self.path = None  # nothing more is attempted: the error is this one line
            raise ConfigError(f"metrics.textfile_dir {d}: {why}")

    def on_health(self, verdict: HealthVerdict, gpus: Mapping[str, Mapping[str, float]], ts: float) -> bool:
        """Record the node's verdict and the GPU readings behind it; True when the file was rewritten."""
        facts = tuple(
            sorted(
                (gpu, tuple(sorted((k, float(v)) for k, v in values.items() if k in GPU_FACTS)))
                for gpu, values in gpus.items()
            )
        )
        new = _Verdict(verdict, facts, ts)
        if self._verdict is not None and self._verdict.same_facts(new):
            return False
        self._verdict = new
        return self._write()

    def on_exit(self, code: ExitCode, reason: str) -> None:
        """Why this supervisor exits: written before it does."""
        self._exit = (code, reason, self._clock())
        self._write()

    def render(self) -> bytes:
        """The facts in Prometheus's text format (what node_exporter's textfile collector parses)."""
        registry, node = CollectorRegistry(), self.node
        if self._verdict is not None:
            v = self._verdict
            Gauge(
                "resilient_node_health_verdict",
                "The node's last health verdict (1), with the checks behind it and the reason",
                ("node", "verdict", "check", "reason"),
                registry=registry,
            ).labels(node, v.verdict.verdict.value, ",".join(v.verdict.checks), v.verdict.reason[:REASON_MAX]).set(1)
            Gauge(
                "resilient_node_health_verdict_timestamp_seconds",
                "Unix time the node reached its last health verdict",
                ("node",),
                registry=registry,
            ).labels(node).set(v.ts)
            gauges = {
                key: Gauge(metric, help_, ("node", "gpu"), registry=registry)
                for key, (metric, help_) in GPU_FACTS.items()
            }
            for gpu, values in v.gpus:
                for key, value in values:
                    gauges[key].labels(node, gpu).set(value)
        if self._exit is not None:
            code, reason, ts = self._exit
            Gauge(
                "resilient_supervisor_exit_code",
                "Exit code of the node's last supervisor, with its name and reason",
                ("node", "outcome", "reason"),
                registry=registry,
            ).labels(node, code.name.lower(), reason[:REASON_MAX]).set(int(code))
            Gauge(
                "resilient_supervisor_exit_timestamp_seconds",
                "Unix time the node's last supervisor exited",
                ("node",),
                registry=registry,
            ).labels(node).set(ts)
        return generate_latest(registry)

    def _write(self) -> bool:
        """Replace the file; a failure is told once per kind on stderr and never ends the supervisor."""
        if self.path is None:
            return False
        try:
            atomic_write(self.path, self.render(), mode=_MODE, durable=False)
            return True
        except OSError as err:
            if (err.errno or 0) not in self._errors_told:
                self._errors_told.add(err.errno or 0)
                print(f"resilient: cannot write node facts to {self.path}: {err.strerror or err}", file=sys.stderr)
            return False


def _previous_exit(path: Path) -> tuple[ExitCode, str, float] | None:
    """The exit of the node's previous supervisor, from its file; None when there is none or it is unreadable."""
    try:
        samples = {s.name: s for f in text_string_to_metric_families(path.read_text()) for s in f.samples}
        code, ts = samples["resilient_supervisor_exit_code"], samples["resilient_supervisor_exit_timestamp_seconds"]
        return ExitCode(int(code.value)), code.labels["reason"], ts.value
    except (OSError, ValueError, KeyError):
        return None
