"""The sbatch script of a run: a pure function of the resolved config and the run directory."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import jinja2

from resilient.config import RunConfig
from resilient.core.errors import ConfigError
from resilient.core.rundir import RunDir
from resilient.slurm.timing import signal_seconds

# Signals a bash trap can catch and forward (Slurm's --signal takes the name without SIG).
FORWARDABLE_SIGNALS = ("USR1", "USR2", "TERM", "INT", "HUP", "URG")
SCRIPT_NAME = "job.sbatch"

_TEMPLATE = jinja2.Environment(
    loader=jinja2.PackageLoader("resilient.slurm", "."),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
    autoescape=False,
)
_TEMPLATE.filters["q"] = shlex.quote


def node_range(cfg: RunConfig) -> range:
    """Node counts the run may train on: `nodes`, down to `slurm.min_nodes` after excluding bad nodes."""
    return range(cfg.slurm.min_nodes or cfg.nodes, cfg.nodes + 1)


def slurm_signal(cfg: RunConfig) -> str:
    """The preemption signal as Slurm and bash name it (USR2)."""
    return cfg.supervisor.preempt_signal.removeprefix("SIG")


def check_submittable(cfg: RunConfig, run_dir: Path) -> None:
    """Constraints that only matter on Slurm; raises a one-line ConfigError."""
    s = cfg.slurm
    if not run_dir.is_absolute() or re.search(r"\s", str(run_dir)):
        raise ConfigError(f"run_dir: {run_dir} must be an absolute path without whitespace")
    if slurm_signal(cfg) not in FORWARDABLE_SIGNALS:
        raise ConfigError(
            f"supervisor.preempt_signal: {cfg.supervisor.preempt_signal} cannot be trapped "
            f"and forwarded by the batch shell (choose from SIG{', SIG'.join(FORWARDABLE_SIGNALS)})"
        )
    if s.gpus_per_node and s.gpus_per_node != cfg.supervisor.nproc_per_node:
        raise ConfigError(
            f"slurm.gpus_per_node: {s.gpus_per_node} differs from supervisor.nproc_per_node "
            f"{cfg.supervisor.nproc_per_node} (one rank per GPU)"
        )
    if s.min_nodes is not None and s.min_nodes > cfg.nodes:
        raise ConfigError(f"slurm.min_nodes: {s.min_nodes} exceeds nodes {cfg.nodes}")
    p, t = cfg.parallel, cfg.train
    for n in node_range(cfg) if cfg.supervisor.runs_own_trainer else ():  # another script sizes itself
        world = n * cfg.supervisor.nproc_per_node
        model_parallel = p.tp * p.pp * p.cp
        dp = world // model_parallel
        if world % model_parallel or t.global_batch % (t.micro_batch * dp):
            raise ConfigError(
                f"slurm.min_nodes: on {n} node(s) the world size {world} does not fit "
                f"tp*pp*cp={model_parallel} and global_batch={t.global_batch} (micro_batch {t.micro_batch})"
            )
    seconds, _ = signal_seconds(cfg)
    if seconds >= s.time_limit_minutes * 60:
        raise ConfigError(
            f"slurm.time_limit_minutes: {s.time_limit_minutes} min leaves no time to train "
            f"before the {seconds}s checkpoint warning"
        )


def _time_limit(minutes: int) -> str:
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00"


def supervise_command(python: str, run_dir: Path) -> list[str]:
    """What srun starts on every node."""
    return [python, "-m", "resilient.cli", "supervise", str(RunDir(run_dir).config)]


def render_batch_script(cfg: RunConfig, run_dir: Path, *, python: str) -> str:
    """The batch script for this run; `python` is the interpreter the nodes run resilient with."""
    check_submittable(cfg, run_dir)
    s = cfg.slurm
    seconds, reason = signal_seconds(cfg)
    return _TEMPLATE.get_template(SCRIPT_NAME + ".j2").render(
        run_dir=str(run_dir),
        python=python,
        job_name=s.job_name or f"resilient-{run_dir.name}",
        nodes=cfg.nodes,
        spare_nodes=s.spare_nodes,
        gpus_per_node=s.gpus_per_node,
        cpus_per_task=s.cpus_per_task,
        time_limit=_time_limit(s.time_limit_minutes),
        partition=s.partition,
        account=s.account,
        qos=s.qos,
        exclusive=s.exclusive,
        exclude=",".join(s.exclude),
        signal=slurm_signal(cfg),
        signal_seconds=seconds,
        signal_reason=reason,
        extra_directives=s.extra_directives,
        supervise=shlex.join(supervise_command(python, run_dir)),
    )
