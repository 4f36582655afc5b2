"""Every name inside a run directory, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """The paths of RUN_DIR; each property is a path, nothing is created here."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        """The resolved config the supervisor wrote (read by ranks and requeues)."""
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        """Held (flock) by node 0's supervisor for the life of a run; records pid, host, run id."""
        return self.root / ".lock"

    @property
    def ledger(self) -> Path:
        """Append-only JSONL of what happened."""
        return self.root / "ledger.jsonl"

    @property
    def train_log(self) -> Path:
        """One JSON line per step and per validation."""
        return self.root / "train_log.jsonl"

    @property
    def status(self) -> Path:
        """What `resilient status` reads."""
        return self.root / "status.json"

    @property
    def checkpoints(self) -> Path:
        """Default checkpoint directory (`checkpoint.dir` may name another)."""
        return self.root / "checkpoints"

    @property
    def logs(self) -> Path:
        """One log file per rank per attempt."""
        return self.root / "logs"

    @property
    def incidents(self) -> Path:
        """Evidence of each hang or crash."""
        return self.root / "incidents"

    @property
    def rank_steps(self) -> Path:
        """Sampled step time of every rank (for `resilient report`)."""
        return self.root / "rank_steps.jsonl"

    @property
    def sockets(self) -> Path:
        """The supervisors' heartbeat sockets (0700)."""
        return self.root / "sock"

    def heartbeat_socket(self, node: int) -> Path:
        return self.sockets / f"node{node}.hb"

    @property
    def data_cache(self) -> Path:
        """Pre-tokenized shards when `data.cache_dir` is not set."""
        return self.root / "data_cache"

    @property
    def calibration(self) -> Path:
        """Per-node calibration that survives requeues (0700): failure history, supervised time and the
        observed step/save times behind the hang timeouts."""
        return self.root / "calibration"

    def calibration_file(self, node: int) -> Path:
        return self.calibration / f"node{node}.json"

    @property
    def faults(self) -> Path:
        """Chaos fault injections the ranks read."""
        return self.root / "faults.json"
