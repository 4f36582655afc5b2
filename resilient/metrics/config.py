"""Metrics endpoint configuration."""

from pathlib import Path

from pydantic import Field

from resilient.core.configbase import Section


class MetricsConfig(Section):
    """Where each supervisor serves /metrics and writes its durable facts, and the limits its alerts compare against."""

    enabled: bool = True
    """Serve Prometheus metrics from the supervisor."""
    address: str = "127.0.0.1"
    """Address to bind; loopback by default so a single-machine run exposes nothing."""
    port: int = Field(9464, ge=0, le=65535)
    """TCP port; 0 picks a free one (written to status.json)."""
    textfile_dir: Path | None = None
    """node_exporter's textfile-collector directory on every node (`--collector.textfile.directory`). The
    supervisor writes the facts that must outlive it there (the node's last health verdict, the last XID
    and ECC counters per GPU, why it exited), as resilient_<node>.prom; node_exporter keeps serving them
    after the supervisor exits or the job moves to other nodes. Unset: those facts live only as long as
    the supervisor, and a GPU alert may never fire (docs/operations.md#node-facts)."""
    heartbeat_max_age_s: float = Field(300.0, gt=0)
    """Heartbeat age above which the ResilientRankHeartbeatStale alert fires while running (exported as
    resilient_heartbeat_age_limit_seconds): longer than the run's longest step, save or evaluation, so that
    it fires only when a rank hangs and the supervisor's own hang detection has not acted."""
    checkpoint_max_age_s: float = Field(7200.0, gt=0)
    """Age of the last complete checkpoint above which the ResilientCheckpointTooOld alert fires
    (exported as resilient_checkpoint_age_limit_seconds)."""
    goodput_interval_s: float = Field(60.0, gt=0)
    """How often the supervisor recomputes goodput from the ledger and train log for /metrics."""
