"""Collective probe: a timed all-reduce over every rank, then pair tests to name a bad rank or link.

Bus bandwidth follows nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n, in GB/s (1e9).
The probe runs on a fresh process group whose timeout is the probe's, so it works inside a trainer's
existing default group (NCCL on GPU, gloo on CPU) and in the standalone probe (health.collective_local).

A rank that arrives late at every all-reduce is named by lateness: each rank times its own wait inside
the all-reduce, and the late rank waits least. When the bus bandwidth is below the threshold, ping-pong
tests between ring neighbours (two or three rounds of disjoint pairs) name a rank whose pairs are all
slow, or a slow link between two ranks.
"""

from __future__ import annotations

import statistics
import time
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field

from health.config import HealthConfig
from health.types import CheckResult, Severity, fatal, ok, skipped


class Culprit(BaseModel):
    rank: int
    node: str = ""
    reason: str


class SlowLink(BaseModel):
    a: int
    b: int
    gbps: float


class ProbeResult(BaseModel):
    """What one probe measured; every rank of a completed probe holds the same result."""

    completed: bool
    world_size: int
    backend: str = ""
    nbytes: int = 0
    iters: int = 0
    seconds_per_iter: float | None = None
    algbw_gbps: float | None = None
    busbw_gbps: float | None = None
    min_busbw_gbps: float = 0.0
    nodes: list[str] = Field(default_factory=list)
    culprits: list[Culprit] = Field(default_factory=list)
    slow_links: list[SlowLink] = Field(default_factory=list)
    error: str = ""

    @classmethod
    def configured(cls, cfg: HealthConfig, world_size: int, backend: str, **fields: Any) -> ProbeResult:
        """A result not (yet) completed, carrying the probe settings of `cfg`: size, iterations, threshold."""
        return cls(
            completed=False,
            world_size=world_size,
            backend=backend,
            nbytes=cfg.collective_nbytes,
            iters=cfg.collective_iters,
            min_busbw_gbps=cfg.collective_min_busbw_gbps,
            **fields,
        )


# ---- pure parts -------------------------------------------------------------------------------


def bus_bandwidth(nbytes: int, seconds: float, n: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s for an all-reduce of `nbytes` over `n` ranks taking `seconds`."""
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * 2 * (n - 1) / n


def ring_edges(n: int) -> list[tuple[int, int]]:
    """Neighbour pairs of a ring over n ranks (one pair when n == 2)."""
    if n < 2:
        return []
    if n == 2:
        return [(0, 1)]
    return [(i, (i + 1) % n) for i in range(n)]


def ring_rounds(n: int) -> list[list[tuple[int, int]]]:
    """The ring edges split into rounds of disjoint pairs (2 rounds, 3 when n is odd)."""
    edges = ring_edges(n)
    if n <= 2:
        return [edges] if edges else []
    even = [edges[i] for i in range(0, n, 2) if not (n % 2 and i == n - 1)]
    odd = [edges[i] for i in range(1, n, 2)]
    last = [edges[n - 1]] if n % 2 else []
    return [r for r in (even, odd, last) if r]


def late_ranks(durations: list[list[float]], late_s: float) -> list[tuple[int, float]]:
    """Ranks whose median lateness per all-reduce exceeds late_s, with that lateness.

    durations[r][i] is the time rank r spent inside all-reduce i; everyone leaves together, so a
    rank's lateness in iteration i is the longest wait minus its own."""
    iters = len(durations[0]) if durations else 0
    out = []
    for r, mine in enumerate(durations):
        lateness = statistics.median(max(d[i] for d in durations) - mine[i] for i in range(iters)) if iters else 0.0
        if lateness > late_s:
            out.append((r, lateness))
    return out


def culprits_from_pairs(
    n: int, pair_gbps: dict[tuple[int, int], float], min_gbps: float
) -> tuple[list[int], list[SlowLink]]:
    """Ranks all of whose ring pairs are slow, and the slow links those ranks do not explain.

    A pair is slow when it is below `min_gbps` and, with three or more pairs to compare, also below half
    their median: when every pair is equally slow the fault is not one rank's (or the threshold is wrong)."""
    typical = statistics.median(pair_gbps.values()) if len(pair_gbps) >= 3 else float("inf")
    slow = {e: g for e, g in pair_gbps.items() if g < min_gbps and g < typical / 2}
    bad = [r for r in range(n) if n > 2 and all(e in slow for e in pair_gbps if r in e)]
    links = [SlowLink(a=a, b=b, gbps=round(g, 3)) for (a, b), g in slow.items() if a not in bad and b not in bad]
    return bad, links


def judge(result: ProbeResult, cfg: HealthConfig) -> CheckResult:
    """The probe's verdict: failure is fatal, slow or late ranks get `collective_slow_severity`."""
    name = "collective.allreduce"
    values: dict[str, Any] = result.model_dump(exclude={"nodes"})
    who = "; ".join(f"rank {c.rank}" + (f" ({c.node})" if c.node else "") + f": {c.reason}" for c in result.culprits)
    if result.world_size < 2:
        return skipped(name, "one rank: nothing to probe")
    if not result.completed:
        return fatal(
            name,
            f"all-reduce over {result.world_size} ranks failed: {result.error}" + (f"; {who}" if who else ""),
            **values,
        )
    bw = f"busbw {result.busbw_gbps:.4g} GB/s over {result.world_size} ranks ({result.backend}, {result.nbytes} B)"
    problems = []
    if result.min_busbw_gbps and (result.busbw_gbps or 0.0) < result.min_busbw_gbps:
        problems.append(f"below {result.min_busbw_gbps} GB/s")
    if who:
        problems.append(who)
    problems += [f"slow link rank {s.a} <-> rank {s.b} ({s.gbps} GB/s)" for s in result.slow_links]
    if problems:
        severity = Severity.FATAL if cfg.collective_slow_severity == "fatal" else Severity.WARN
        return CheckResult(name, severity, f"{bw}: " + "; ".join(problems), values)
    return ok(name, bw, **values)


# ---- the probe (collective: every rank of the default group calls it) -----------------------------


def probe_collective(cfg: HealthConfig, *, node: str = "", store: Any = None, delay_s: float = 0.0) -> ProbeResult:
    """Run the probe over the default process group; every rank must call it.

    store: a torch.distributed Store where each rank records its progress (probe/progress/<rank>) so a
    launcher can tell which rank lagged when the probe times out. delay_s: fault injection for drills
    and tests, this rank sleeps that long before each all-reduce and each pair transfer."""
    import torch
    import torch.distributed as dist

    rank, n = dist.get_rank(), dist.get_world_size()
    backend = str(dist.get_backend())
    result = ProbeResult.configured(cfg, n, backend)
    progress = 0

    def mark() -> None:
        nonlocal progress
        progress += 1
        if store is not None:
            store.set(f"probe/progress/{rank}", str(progress))

    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        mark()
        pg = dist.new_group(list(range(n)), timeout=timedelta(seconds=cfg.collective_timeout_s), backend=backend)
        nodes: list[Any] = [None] * n
        dist.all_gather_object(nodes, node, group=pg)
        result.nodes = [str(x) for x in nodes]
        buf = torch.zeros(max(cfg.collective_nbytes // 4, 1), dtype=torch.float32, device=device)
        mark()
        dist.all_reduce(buf, group=pg)  # warm-up: connections, algorithms
        sync()
        mine = torch.zeros(n, cfg.collective_iters, dtype=torch.float64, device=device)
        for i in range(cfg.collective_iters):
            if delay_s:
                time.sleep(delay_s)
            mark()
            t0 = time.perf_counter()
            dist.all_reduce(buf, group=pg)
            sync()
            mine[rank, i] = time.perf_counter() - t0
        mark()
        dist.all_reduce(mine, group=pg)
        durations = mine.cpu().tolist()
        per_iter = statistics.fmean(max(d[i] for d in durations) for i in range(cfg.collective_iters))
        result.seconds_per_iter = per_iter
        algbw, busbw = bus_bandwidth(buf.numel() * 4, per_iter, n)
        result.algbw_gbps, result.busbw_gbps = algbw, busbw
        result.culprits = [
            Culprit(rank=r, node=result.nodes[r], reason=f"arrived {late:.3f} s late at each all-reduce")
            for r, late in late_ranks(durations, cfg.collective_late_s)
        ]
        if cfg.collective_min_busbw_gbps and busbw < cfg.collective_min_busbw_gbps:
            pair_gbps = _pair_tests(pg, buf, rank, n, delay_s, mark, sync)
            bad, result.slow_links = culprits_from_pairs(n, pair_gbps, cfg.collective_min_busbw_gbps)
            named = {c.rank: c for c in result.culprits}
            for r in bad:
                if r in named:
                    named[r].reason += "; every pair test with its neighbours is slow"
                else:
                    result.culprits.append(
                        Culprit(rank=r, node=result.nodes[r], reason="every pair test with its neighbours is slow")
                    )
        result.completed = True
        dist.destroy_process_group(pg)
    except Exception as err:  # torch raises RuntimeError/DistBackendError subclasses on timeouts and lost peers
        result.error = f"rank {rank}: {str(err).splitlines()[0][:300]}"
    return result


def _pair_tests(
    pg: Any, buf: Any, rank: int, n: int, delay_s: float, mark: Any, sync: Any
) -> dict[tuple[int, int], float]:
    """Ping-pong `buf` between ring neighbours, round by round; returns GB/s per pair (known to every rank)."""
    import torch
    import torch.distributed as dist

    edges = ring_edges(n)
    seconds = torch.zeros(len(edges), dtype=torch.float64, device=buf.device)
    for pairs in ring_rounds(n):
        dist.barrier(group=pg)
        mark()
        for a, b in pairs:
            if rank not in (a, b):
                continue
            peer = b if rank == a else a
            t0 = time.perf_counter()
            if rank == a:
                _send(buf, peer, pg, delay_s)
                dist.recv(buf, peer, group=pg)
            else:
                dist.recv(buf, peer, group=pg)
                _send(buf, peer, pg, delay_s)
            sync()
            seconds[edges.index((a, b))] = time.perf_counter() - t0
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX, group=pg)
    nbytes = buf.numel() * buf.element_size()
    return {e: 2 * nbytes / max(s, 1e-9) / 1e9 for e, s in zip(edges, seconds.cpu().tolist(), strict=True)}


def _send(buf: Any, peer: int, pg: Any, delay_s: float) -> None:
    import torch.distributed as dist

    if delay_s:
        time.sleep(delay_s)
    dist.send(buf, peer, group=pg)
