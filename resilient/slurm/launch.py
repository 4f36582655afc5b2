"""`resilient launch`: validate, render, write into the run directory, submit."""

from __future__ import annotations

import os
from pathlib import Path

from resilient.config import RunConfig, dump_config
from resilient.core import ledger
from resilient.core import lock as run_lock
from resilient.core.atomic import atomic_write
from resilient.core.errors import RunDirBusy
from resilient.core.events import LedgerEvent
from resilient.core.rundir import RunDir
from resilient.slurm import jobs
from resilient.slurm.jobs import last_job_id
from resilient.slurm.render import SCRIPT_NAME


def submit_run(cfg: RunConfig, run_dir: Path, script: str) -> str:
    """Write config.yaml and job.sbatch into RUN_DIR, submit, record `submitted`; returns the job ID."""
    previous = last_job_id(run_dir)
    if previous is not None and jobs.job_state(previous) in jobs.ACTIVE_STATES:
        raise RunDirBusy(f"{run_dir} already has an active job {previous} (scancel it first)")
    held = run_lock.acquire(run_dir)  # a local `resilient run` on this dir: refuse before writing
    held.release()  # the job's node-0 supervisor takes it for the run's life
    RunDir(run_dir).logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(run_dir, 0o700)
    atomic_write(RunDir(run_dir).config, dump_config(cfg))
    atomic_write(run_dir / SCRIPT_NAME, script)
    job_id = jobs.submit(run_dir / SCRIPT_NAME)
    ledger.append(run_dir, LedgerEvent.SUBMITTED, job_id=job_id, script=str(run_dir / SCRIPT_NAME), nodes=cfg.nodes)
    return job_id
