"""CLI commands of the supervisor: `run` (one machine), `supervise` (one per node); `status` is in resilient.status."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from resilient.config import RunConfig, load_config
from resilient.core import lock as run_lock
from resilient.core import permissions, secret
from resilient.core.errors import ConfigError
from resilient.metrics.textfile import NodeFacts
from resilient.rank.env import node_name
from resilient.supervisor.topology import Topology, local, resolve_topology

_RUN_DIR = typer.Option(None, "--run-dir", help="Run directory (default: the config's run_dir).")
_SET = typer.Option([], "--set", help="Override a config key: --set train.steps=50 (repeatable).")
SHARED_DIR_FLAG = "--set supervisor.allow_shared_dir=true"


def _load(config: Path, run_dir: Path | None, overrides: list[str]) -> RunConfig:
    cfg = load_config(config, overrides)
    resolved = (run_dir or cfg.run_dir).expanduser().resolve()
    return load_config(config, [*overrides, f"run_dir={resolved}"])


def private_dirs(cfg: RunConfig) -> list[Path]:
    """Every directory the run writes whose whole path must be this user's alone: the run directory,
    the checkpoint directory, the memory tier's directory when one is configured (the default one, in
    /dev/shm under a name derived from the run's secret, is the ranks' to check: they fall back to disk)."""
    return [
        cfg.run_dir,
        cfg.checkpoint.root(cfg.run_dir),
        *([cfg.checkpoint.memory_dir] if cfg.checkpoint.memory_dir is not None else []),
    ]


def _supervise(cfg: RunConfig, topo: Topology) -> None:
    from resilient.supervisor.daemon import Supervisor  # heavy imports (torch) only when supervising

    want = cfg.nodes + cfg.slurm.spare_nodes
    if topo.slots != want:
        spares = f" + {cfg.slurm.spare_nodes} spare node(s)" if cfg.slurm.spare_nodes else ""
        raise ConfigError(f"nodes: the config says {cfg.nodes} node(s){spares} but the job has {topo.slots}")
    # The whole path to every directory the run writes, before anything is created (the supervisor checks
    # again at every attempt, and so do the ranks).
    permissions.require_private(private_dirs(cfg), allowed=cfg.supervisor.allow_shared_dir, flag=SHARED_DIR_FLAG)
    NodeFacts(cfg.metrics.textfile_dir, topo.node_name).check()
    if topo.slot == 0:
        # Before any side effect (cleanup, socket, config.yaml): a second run on this dir touches nothing.
        # Held until this process exits; other nodes join through the coordinator's store.
        run_lock.acquire(cfg.run_dir, os.environ.get("SLURM_JOB_ID"))
        _record_slurm_requeue(cfg.run_dir)
    run_lock.make_run_dir(cfg.run_dir)
    secret.load_or_create(cfg.run_dir)  # anything but the run's own secret file is one line here, before any rank
    # sys.exit, not typer.Exit: in standalone_mode=False click returns typer.Exit's code instead of exiting.
    sys.exit(Supervisor(cfg, topo, cfg.run_dir).run())


def _record_slurm_requeue(run_dir: Path) -> None:
    """A requeue Slurm did itself (the batch host lost) gets its ledger record, with why, at the next start."""
    from resilient.core import ledger
    from resilient.core.events import LedgerEvent
    from resilient.slurm.policy import unrecorded_requeue

    record = unrecorded_requeue(
        ledger.read(run_dir), int(os.environ.get("SLURM_RESTART_COUNT") or 0), os.environ.get("SLURM_JOB_ID")
    )
    if record is not None:
        ledger.append(run_dir, LedgerEvent.REQUEUE, **record)
        print(f"resilient: {record['reason']}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add this component's commands to the `resilient` app."""

    @app.command("run")
    def run(
        config: Path = typer.Argument(..., help="Run config (YAML)."),
        run_dir: Path | None = _RUN_DIR,
        set_: list[str] = _SET,
    ) -> None:
        """Train on this machine: one supervisor (node 0 of 1) spawning supervisor.nproc_per_node ranks."""
        cfg = _load(config, run_dir, set_)
        _supervise(cfg, local(node_name(os.environ)))

    @app.command("supervise")
    def supervise(
        config: Path = typer.Argument(..., help="Run config (YAML)."),
        node_rank: int | None = typer.Option(
            None, help="This supervisor's place in the allocation (default: SLURM_NODEID)."
        ),
        nnodes: int | None = typer.Option(
            None, help="Supervisors in the allocation, spare nodes included (default: SLURM_NNODES)."
        ),
        master_addr: str | None = typer.Option(
            None, help="Host of every supervisor when --hosts is not given (one machine)."
        ),
        hosts: str | None = typer.Option(
            None, help="Host of each supervisor, comma-separated in node-rank order (default: SLURM_JOB_NODELIST)."
        ),
        master_port: int | None = typer.Option(None, help="Coordination store port (default: supervisor.store_port)."),
        run_dir: Path | None = _RUN_DIR,
        set_: list[str] = _SET,
    ) -> None:
        """Supervise this node's ranks as one node of a multi-node job (one per node, e.g. under srun)."""
        cfg = _load(config, run_dir, set_)
        topo = resolve_topology(
            os.environ,
            node_rank=node_rank,
            nnodes=nnodes,
            master_addr=master_addr,
            master_port=master_port,
            default_port=cfg.supervisor.store_port,
            hosts=hosts.split(",") if hosts else None,
        )
        _supervise(cfg, topo)
