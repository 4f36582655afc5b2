"""The end of an allocation: decide (policy.py), record the decision in the ledger, act on Slurm."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from resilient.config import dump_config, load_config
from resilient.core import ledger
from resilient.core.atomic import atomic_write
from resilient.core.errors import ConfigError
from resilient.core.events import LedgerEvent
from resilient.core.rundir import RunDir
from resilient.slurm import jobs
from resilient.slurm.policy import Action, RequeueDecision, decide_requeue, job_end_from_ledger, job_ref


def handle_job_end(
    run_dir: Path, exit_code: int, *, since: float, env: Mapping[str, str]
) -> tuple[RequeueDecision, str, int]:
    """Run inside the batch job after its step ended. Writes `requeue` or `job_end` to the ledger; returns
    the decision, why, and the run's exit code (the coordinator's recorded decision, else srun's)."""
    if "SLURM_JOB_ID" not in env:
        raise ConfigError("on-exit runs inside a Slurm batch job (SLURM_JOB_ID is not set)")
    cfg = load_config(RunDir(run_dir).config)
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or cfg.nodes + cfg.slurm.spare_nodes)
    end = job_end_from_ledger(
        ledger.read(run_dir), exit_code=exit_code, since=since, nodes=nodes, spares=cfg.slurm.spare_nodes
    )
    ref = job_ref(env)
    end = dataclasses.replace(end, cancelled=jobs.being_cancelled(ref))
    decision, reason = decide_requeue(end, cfg.slurm, exclude_stragglers=cfg.health.straggler_action == "exclude")
    run_code = exit_code if end.outcome_code is None else end.outcome_code
    restarts = int(env.get("SLURM_RESTART_COUNT") or 0)

    drain_errors = {}
    for node in decision.drain:
        try:
            jobs.drain(node, f"resilient: {reason}")
        except jobs.SlurmError as err:
            drain_errors[node] = str(err)
    if decision.action is not Action.REQUEUE:
        ledger.append(
            run_dir,
            LedgerEvent.JOB_END,
            job_id=ref,
            exit_code=exit_code,
            state=str(decision.action),
            reason=reason,
            slurm_restart_count=restarts,
            drained=[n for n in decision.drain if n not in drain_errors],
            drain_errors=drain_errors,
        )
        return decision, reason, run_code

    if decision.nodes is not None or decision.spares is not None:
        # The next allocation is smaller: the run's config must say so (the supervisors check it).
        spares = cfg.slurm.spare_nodes if decision.spares is None else decision.spares
        alloc = decision.nodes if decision.nodes is not None else end.nodes
        smaller = cfg.model_copy(
            update={"nodes": alloc - spares, "slurm": cfg.slurm.model_copy(update={"spare_nodes": spares})}
        )
        atomic_write(RunDir(run_dir).config, dump_config(smaller))
    # Recorded before the requeue: the requeue ends this job, and the record must survive it.
    ledger.append(
        run_dir,
        LedgerEvent.REQUEUE,
        job_id=ref,
        exclude=list(decision.exclude),
        reason=reason,
        cause=str(decision.cause),
        exit_code=exit_code,
        nodes=decision.nodes,
        drained=[n for n in decision.drain if n not in drain_errors],
        drain_errors=drain_errors,
        slurm_restart_count=restarts,
    )
    try:
        jobs.requeue(ref, exclude=decision.exclude, nodes=decision.nodes)
    except jobs.SlurmError as err:
        if jobs.job_state(ref) in ("PENDING", "REQUEUED", "REQUEUE_HOLD"):
            return decision, f"{reason} (Slurm had requeued it already)", run_code
        reason = f"requeue failed: {err}"
        ledger.append(
            run_dir,
            LedgerEvent.JOB_END,
            job_id=ref,
            exit_code=exit_code,
            state="requeue_failed",
            reason=reason,
            slurm_restart_count=restarts,
        )
    return decision, reason, run_code
