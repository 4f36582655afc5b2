"""Slurm submission configuration (owned by the slurm package)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from resilient.core.configbase import Section

_NODE_NAME = re.compile(r"^[A-Za-z0-9_.\-\[\],]+$")
_SAFE_WORD = re.compile(r"^[A-Za-z0-9_.\-:+=/,@%]+$")


class SlurmConfig(Section):
    """How `resilient launch` renders and submits the batch job, and how it reacts when it ends."""

    partition: str | None = None
    """Slurm partition to submit to (None: the cluster default)."""
    account: str | None = None
    """Account to charge (None: the user's default)."""
    qos: str | None = None
    """Quality of service (None: the default)."""
    job_name: str | None = None
    """Job name (None: `resilient-<run dir name>`)."""
    time_limit_minutes: int = Field(24 * 60, ge=1)
    """Wall-clock limit of one allocation; the run continues in the next one after a requeue."""
    gpus_per_node: int = Field(0, ge=0)
    """GPUs requested per node as `--gres=gpu:N` (0: none; otherwise equal to supervisor.nproc_per_node)."""
    cpus_per_task: int | None = Field(None, ge=1)
    """CPUs for each node's supervisor task and its ranks (None: the partition default)."""
    exclusive: bool = True
    """Request whole nodes (`--exclusive`): training shares nodes with nothing else."""
    exclude: list[str] = Field(default_factory=list)
    """Nodes never to use (Slurm host names); bad nodes found during the run are added to the job."""
    min_nodes: int | None = Field(None, ge=1)
    """Smallest node count the run may shrink to when it excludes a bad node (None: never shrink)."""
    spare_nodes: int = Field(0, ge=0)
    """Nodes allocated beyond `nodes`, on standby: each runs a supervisor with warm standby ranks and
    continuous health checks, and takes a failed node's place in-job (same node rank, same placement,
    no requeue). The job is submitted with `--no-kill` so that losing a node does not end it."""
    signal_seconds: int | None = Field(None, ge=1, le=65535)
    """Seconds before the time limit to send supervisor.preempt_signal (None: derived from the
    expected checkpoint time, see docs/slurm.md)."""
    expected_step_seconds: float = Field(30.0, gt=0)
    """Longest expected optimizer step: the stop request is honoured at the next step boundary."""
    storage_write_gbps_per_node: float = Field(2.0, gt=0)
    """Checkpoint write bandwidth per node in GB/s, used to estimate the final save's duration."""
    signal_margin_seconds: int = Field(60, ge=0)
    """Extra seconds for teardown, the requeue call and Slurm's up-to-60-s signal timer resolution."""
    drain_bad_nodes: bool = False
    """Drain a node that failed its health checks (`scontrol update State=DRAIN`; needs operator rights)."""
    max_crash_requeues: int = Field(3, ge=0)
    """Requeues allowed after the supervisors crashed (exit codes without a known meaning)."""
    extra_directives: list[str] = Field(default_factory=list)
    """Further sbatch options, one per entry, e.g. `--constraint=h100` (rendered as #SBATCH lines)."""

    @field_validator("exclude")
    @classmethod
    def _node_names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _NODE_NAME.match(name):
                raise ValueError(f"{name!r} is not a Slurm node name or host list")
        return value

    @field_validator("partition", "account", "qos", "job_name")
    @classmethod
    def _one_word(cls, value: str | None) -> str | None:
        if value is not None and not _SAFE_WORD.match(value):
            raise ValueError(f"{value!r} must be one word without spaces or shell characters")
        return value

    @field_validator("extra_directives")
    @classmethod
    def _directives(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.startswith("-") or "\n" in item or "\r" in item:
                raise ValueError(f"{item!r} must be one sbatch option starting with '-' on one line")
        return value
