"""The standalone collective probe: N local processes rendezvous on a TCPStore and run the probe.

The launcher hosts the store on a free port. Each worker marks `joined/<rank>` before joining the
process group, its progress while probing, and leaves its result under `result/<rank>`, so after a
failure the launcher can name the rank that never joined, stopped early or gave no result.
"""

from __future__ import annotations

import multiprocessing
import time
from datetime import timedelta
from typing import Any

from health.collective import Culprit, ProbeResult, probe_collective
from health.config import HealthConfig
from health.types import CheckResult

_STARTUP_MARGIN_S = 15.0


def run_local_probe(
    cfg: HealthConfig,
    world_size: int,
    *,
    node: str,
    backend: str = "gloo",
    delays: dict[int, float] | None = None,
    absent: set[int] | None = None,
) -> ProbeResult:
    """Probe `world_size` local ranks; `delays` (rank -> seconds slept before each transfer) and
    `absent` (ranks never started) inject faults for drills and tests."""
    import torch.distributed as dist

    delays, absent = delays or {}, absent or set()
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size + 1,
        True,
        timeout=timedelta(seconds=cfg.collective_timeout_s),
        wait_for_workers=False,
    )
    # A plain fork could inherit locks held by the launcher's threads (the store's server); a fork
    # server is single-threaded, imports torch once and then forks workers quickly.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch.distributed", "health.collective"])
    procs = {
        r: ctx.Process(
            target=_worker,
            args=(r, world_size, store.port, backend, cfg.model_dump(mode="json"), node, delays.get(r, 0.0)),
            name=f"health-probe-{r}",
            daemon=True,
        )
        for r in range(world_size)
        if r not in absent
    }
    for p in procs.values():
        p.start()
    deadline = time.monotonic() + _STARTUP_MARGIN_S + cfg.collective_timeout_s * (cfg.collective_iters + 6)
    for p in procs.values():
        p.join(max(deadline - time.monotonic(), 0.0))
    exit_codes = {}
    for r, p in procs.items():
        if p.is_alive():
            p.kill()
            p.join()
        exit_codes[r] = p.exitcode
    return combine(
        world_size,
        backend,
        cfg,
        joined=_keys(store, "joined", world_size),
        progress={r: int(v) for r, v in _keys(store, "probe/progress", world_size).items()},
        results={r: ProbeResult.model_validate_json(v) for r, v in _keys(store, "result", world_size).items()},
        exit_codes=exit_codes,
        node=node,
    )


def combine(
    world_size: int,
    backend: str,
    cfg: HealthConfig,
    *,
    joined: dict[int, str],
    progress: dict[int, int],
    results: dict[int, ProbeResult],
    exit_codes: dict[int, int | None],
    node: str,
) -> ProbeResult:
    """One result from the workers' records: the common result if all completed, else who is to blame."""
    if len(results) == world_size and all(r.completed for r in results.values()):
        return results[0]
    culprits = [
        Culprit(rank=r, node=node, reason=f"never joined within {cfg.collective_timeout_s:g} s")
        for r in range(world_size)
        if r not in joined
    ]
    ahead = max(progress.values(), default=0)
    for r in sorted(joined):
        if r not in results:
            culprits.append(Culprit(rank=r, node=node, reason=f"gave no result (exit code {exit_codes.get(r)})"))
        elif progress.get(r, 0) < ahead:
            culprits.append(
                Culprit(
                    rank=r,
                    node=node,
                    reason=f"stopped at probe step {progress.get(r, 0)} while others reached step {ahead}",
                )
            )
    errors = [res.error for res in results.values() if res.error]
    return ProbeResult.configured(
        cfg, world_size, backend, culprits=culprits, error=errors[0] if errors else "probe did not complete"
    )


def _keys(store: Any, prefix: str, world_size: int) -> dict[int, str]:
    found = {}
    for r in range(world_size):
        key = f"{prefix}/{r}"
        if store.check([key]):
            found[r] = store.get(key).decode()
    return found


def _worker(rank: int, world_size: int, port: int, backend: str, cfg_json: dict, node: str, delay_s: float) -> None:
    import torch
    import torch.distributed as dist

    cfg = HealthConfig.model_validate(cfg_json)
    timeout = timedelta(seconds=cfg.collective_timeout_s)
    store = dist.TCPStore("127.0.0.1", port, world_size + 1, False, timeout=timeout)
    store.set(f"joined/{rank}", "1")
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world_size, timeout=timeout
        )
        result = probe_collective(cfg, node=node, store=store, delay_s=delay_s)
        dist.destroy_process_group()
    except Exception as err:  # a join timeout: the launcher names the rank that never came
        result = ProbeResult(
            completed=False,
            world_size=world_size,
            backend=backend,
            error=f"rank {rank}: {str(err).splitlines()[0][:300]}",
        )
    store.set(f"result/{rank}", result.model_dump_json())


def check_local_collective(cfg: HealthConfig, nproc: int, *, node: str) -> CheckResult:
    """The probe over this node's `nproc` local ranks, judged: NCCL when there are enough GPUs, else gloo."""
    import torch

    from health.collective import judge

    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    return judge(run_local_probe(cfg, nproc, node=node, backend=backend), cfg)
