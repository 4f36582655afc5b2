"""CLI commands of this component: `resilient plan`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from resilient.config import RunConfig, load_config
from resilient.core.errors import ConfigError
from resilient.planner import Assumptions, Layout, make_plan, render_plan, replica_check_overhead


def _config_for_gpus(path: Path, gpus: int | None, overrides: list[str]) -> RunConfig:
    """The run config, resized to `gpus` by setting nodes = gpus / nproc_per_node.

    The resized config goes through the same validator as a real run (world divisible by
    tp*pp*cp, global batch divisible by micro_batch*dp), so a plan is only made for a layout
    the trainer would accept.
    """
    cfg = load_config(path, overrides)
    if gpus is None:
        return cfg
    per_node = cfg.supervisor.nproc_per_node
    if gpus < 1 or gpus % per_node:
        raise ConfigError(f"--gpus {gpus} is not a positive multiple of supervisor.nproc_per_node={per_node}")
    return load_config(path, [*overrides, f"nodes={gpus // per_node}"])


def plan(
    config: Path = typer.Argument(..., help="Run config YAML."),
    gpus: int | None = typer.Option(None, "--gpus", help="GPUs in the job (default: nodes x nproc_per_node)."),
    mtbf_hours: float | None = typer.Option(
        None, "--mtbf-hours", min=0.001, help="Job MTBF in hours (default: Llama 3's per-GPU failure rate)."
    ),
    ckpt_write_gbps: float = typer.Option(
        Assumptions.ckpt_write_gbps, "--ckpt-write-gbps", min=0.001, help="Aggregate checkpoint write bandwidth, GB/s."
    ),
    restart_overhead_s: float = typer.Option(
        Assumptions.restart_overhead_s,
        "--restart-overhead-s",
        min=0.0,
        help="Rank start after a restart's barrier, seconds (the supervisors' "
        "coordination is measured, the checkpoint read computed).",
    ),
    mfu: float = typer.Option(Assumptions.mfu, "--mfu", min=0.001, max=1.0, help="Expected model FLOPs utilisation."),
    spare_nodes: int | None = typer.Option(
        None, "--spare-nodes", min=0, help="Spare nodes (default: the config's slurm.spare_nodes)."
    ),
    requeue_s: float = typer.Option(
        Assumptions.requeue_s,
        "--requeue-s",
        min=0.0,
        help="What a Slurm requeue costs, seconds (scheduler wait and start).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: --set train.seq_len=8192."),
) -> None:
    """Parameters, memory per GPU, checkpoint cost, Young/Daly checkpoint intervals, spare nodes and predicted
    goodput."""
    cfg = _config_for_gpus(config, gpus, overrides)
    layout = Layout(
        tp=cfg.parallel.tp,
        pp=cfg.parallel.pp,
        cp=cfg.parallel.cp,
        dp=cfg.dp(cfg.world_size),
        distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    arch = cfg.model.architecture()
    try:
        result = make_plan(
            arch,
            layout,
            seq_len=cfg.seq_len,
            micro_batch=cfg.train.micro_batch,
            global_batch=cfg.train.global_batch,
            assume=Assumptions(
                mtbf_hours=mtbf_hours,
                ckpt_write_gbps=ckpt_write_gbps,
                restart_overhead_s=restart_overhead_s,
                mfu=mfu,
                gpus_per_node=cfg.supervisor.nproc_per_node,
                spare_nodes=cfg.slurm.spare_nodes if spare_nodes is None else spare_nodes,
                allocation_hours=cfg.slurm.time_limit_minutes / 60,
                requeue_s=requeue_s,
            ),
        )
    except OverflowError:  # sizes past floating point: no cluster trains (or checkpoints) such a model
        raise ConfigError(
            f"model: hidden_size {arch.hidden_size:.3g}, {arch.num_layers} layers: the plan's figures "
            "overflow (checkpoint size and time beyond floating point); not a trainable model"
        ) from None
    every = cfg.numerics.replica_check_interval_steps
    check = replica_check_overhead(result, every) if every else None
    if as_json:
        typer.echo(
            json.dumps(
                {**result.to_json(), "replica_check": check and {"share": check[0], "reason": check[1]}}, indent=2
            )
        )
        return
    typer.echo(render_plan(result) + (f"\nreplica checks    {check[1]}" if check else ""))


def register(app: typer.Typer) -> None:
    """Add this component's commands to the `resilient` app."""
    app.command("plan")(plan)
