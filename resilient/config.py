"""The run configuration: one YAML file, validated, with dotted `--set key=value` overrides.

Every component owns its small typed section (torchtitan style): the trainer's in trainer.config,
health's in health.config, the supervisor's, metrics' and Slurm's beside their code. `RunConfig`
composes them on top of the trainer's view and checks what spans sections (the layout for the job's
world size).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ConfigDict, Field, model_validator

from health.config import HealthConfig
from resilient.core.configbase import load_section
from resilient.metrics.config import MetricsConfig
from resilient.slurm.config import SlurmConfig
from resilient.supervisor.config import SupervisorConfig
from trainer.config import TrainerConfig


class RunConfig(TrainerConfig):
    """A whole run: the trainer's sections plus supervision, health, metrics and Slurm."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    nodes: int = Field(1, ge=1)
    """Nodes in the job (one supervisor each)."""
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    """Rank supervision and restarts."""
    health: HealthConfig = Field(default_factory=HealthConfig)
    """Health checks."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """Prometheus endpoint."""
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)
    """Slurm submission."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.supervisor.nproc_per_node

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch // (self.train.micro_batch * self.dp(self.world_size))

    @property
    def checkpoint_dir(self) -> Path:
        """Where checkpoints go: `checkpoint.dir`, else RUN_DIR/checkpoints."""
        return self.checkpoint.root(self.run_dir)

    @model_validator(mode="after")
    def _layout(self) -> RunConfig:
        if self.supervisor.runs_own_trainer:  # another script's model and layout are its own business
            self.check_layout(self.world_size)
        return self


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (None: all defaults), apply overrides, validate."""
    return load_section(RunConfig, path, overrides)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (written to the run directory for `status` and requeues)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
