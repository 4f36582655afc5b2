"""Collective probe: real gloo process groups on local processes, plus its pure parts."""

import pytest

from health.collective import (
    ProbeResult,
    bus_bandwidth,
    culprits_from_pairs,
    judge,
    late_ranks,
    ring_edges,
    ring_rounds,
)
from health.collective_local import combine, run_local_probe
from health.config import HealthConfig
from health.types import Severity

SMALL = dict(collective_nbytes=64 << 10, collective_iters=3, collective_timeout_s=3.0)


@pytest.mark.parametrize("n", [2, 4])
def test_probe_reports_bandwidth(n):
    cfg = HealthConfig(**SMALL)
    result = run_local_probe(cfg, n, node="n0")
    assert result.completed, result.error
    assert result.world_size == n and result.backend == "gloo" and result.nodes == ["n0"] * n
    assert result.busbw_gbps > 0 and result.algbw_gbps > 0
    assert result.busbw_gbps == pytest.approx(result.algbw_gbps * 2 * (n - 1) / n, rel=1e-3)
    check = judge(result, cfg)
    assert check.severity is Severity.OK and f"over {n} ranks" in check.reason


def test_sleeping_rank_is_named():
    cfg = HealthConfig(**SMALL, collective_late_s=0.15)
    result = run_local_probe(cfg, 3, node="n0", delays={1: 0.4})
    assert result.completed, result.error
    assert [c.rank for c in result.culprits] == [1]
    assert "late" in result.culprits[0].reason
    check = judge(result, cfg)
    assert check.severity is Severity.WARN and "rank 1 (n0): arrived" in check.reason


def test_slow_probe_runs_pair_tests_that_name_the_rank():
    cfg = HealthConfig(**SMALL, collective_min_busbw_gbps=1000.0)
    result = run_local_probe(cfg, 4, node="n0", delays={2: 0.2})
    assert result.completed, result.error
    assert [c.rank for c in result.culprits] == [2]
    assert "every pair test with its neighbours is slow" in result.culprits[0].reason
    assert judge(result, cfg.model_copy(update={"collective_slow_severity": "fatal"})).severity is Severity.FATAL


def test_rank_that_never_joins_is_caught_by_the_timeout():
    cfg = HealthConfig(**SMALL)
    result = run_local_probe(cfg, 3, node="n0", absent={2})
    assert not result.completed
    assert [(c.rank, c.reason) for c in result.culprits] == [(2, "never joined within 3 s")]
    check = judge(result, cfg)
    assert check.severity is Severity.FATAL and "rank 2 (n0): never joined" in check.reason


def test_bus_bandwidth_follows_nccl_tests():
    algbw, busbw = bus_bandwidth(8_000_000_000, 2.0, 8)
    assert algbw == 4.0 and busbw == 7.0


def test_ring_rounds_cover_every_edge_with_disjoint_pairs():
    for n in range(2, 10):
        rounds = ring_rounds(n)
        assert sorted(e for r in rounds for e in r) == sorted(ring_edges(n))
        for pairs in rounds:
            ranks = [r for e in pairs for r in e]
            assert len(ranks) == len(set(ranks))
        assert len(rounds) <= 3


def test_late_ranks_from_wait_times():
    # rank 2 arrives ~0.5 s late: the others wait 0.5 s inside each all-reduce, it waits ~0
    durations = [[0.51, 0.52, 0.50], [0.50, 0.51, 0.52], [0.01, 0.01, 0.02], [0.52, 0.50, 0.51]]
    late = late_ranks(durations, 0.25)
    assert [r for r, _ in late] == [2] and late[0][1] == pytest.approx(0.5, abs=0.02)
    assert late_ranks([[0.01, 0.02], [0.02, 0.01]], 0.25) == []


def test_culprits_from_pairs():
    pairs = {(0, 1): 10.0, (1, 2): 0.5, (2, 3): 0.4, (3, 0): 10.0}
    bad, links = culprits_from_pairs(4, pairs, 5.0)
    assert bad == [2] and links == []
    bad, links = culprits_from_pairs(4, {(0, 1): 10.0, (1, 2): 0.5, (2, 3): 10.0, (3, 0): 10.0}, 5.0)
    assert bad == [] and [(s.a, s.b) for s in links] == [(1, 2)]
    # uniformly slow: a systemic problem (or a wrong threshold), nobody is blamed
    assert culprits_from_pairs(4, {(0, 1): 1.0, (1, 2): 1.1, (2, 3): 0.9, (3, 0): 1.0}, 5.0) == ([], [])
    bad, links = culprits_from_pairs(2, {(0, 1): 1.0}, 5.0)
    assert bad == [] and [(s.a, s.b) for s in links] == [(0, 1)]


def test_combine_names_the_rank_that_stopped_early():
    cfg = HealthConfig(**SMALL)
    failed = ProbeResult(completed=False, world_size=3, error="rank 0: timed out")
    out = combine(
        3,
        "gloo",
        cfg,
        joined={0: "1", 1: "1", 2: "1"},
        progress={0: 5, 1: 3, 2: 5},
        results={0: failed, 2: failed},
        exit_codes={0: 0, 1: -9, 2: 0},
        node="n0",
    )
    assert not out.completed and out.error == "rank 0: timed out"
    assert [(c.rank, c.reason) for c in out.culprits] == [(1, "gave no result (exit code -9)")]
    out = combine(
        3,
        "gloo",
        cfg,
        joined={0: "1", 1: "1", 2: "1"},
        progress={0: 5, 1: 3, 2: 5},
        results={0: failed, 1: failed, 2: failed},
        exit_codes={0: 0, 1: 0, 2: 0},
        node="n0",
    )
    assert [c.rank for c in out.culprits] == [1] and "stopped at probe step 3" in out.culprits[0].reason


def test_single_rank_probe_is_skipped():
    r = judge(ProbeResult(completed=True, world_size=1), HealthConfig())
    assert r.skipped and r.severity is Severity.OK
