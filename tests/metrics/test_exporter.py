"""NodeMetrics served over real HTTP on loopback: families present, values sane, updates visible."""

from __future__ import annotations

import math
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from resilient.metrics.config import MetricsConfig
from resilient.metrics.exporter import NodeMetrics, throttle_flags

from .feed import NODE, Feeder, heartbeat

FAMILIES = {
    "resilient_run_state",
    "resilient_attempt",
    "resilient_step",
    "resilient_consumed_tokens",
    "resilient_loss",
    "resilient_validation_loss",
    "resilient_learning_rate",
    "resilient_grad_norm",
    "resilient_tokens_per_second",
    "resilient_mfu_ratio",
    "resilient_step_time_seconds",
    "resilient_rank_step",
    "resilient_rank_step_time_seconds",
    "resilient_heartbeat_age_seconds",
    "resilient_straggler_score",
    "resilient_checkpoint_save_blocking_seconds",
    "resilient_checkpoint_save_total_seconds",
    "resilient_checkpoint_size_bytes",
    "resilient_checkpoint_written_bytes",
    "resilient_checkpoint_last_step",
    "resilient_checkpoint_last_complete_timestamp_seconds",
    "resilient_checkpoint_last_complete_age_seconds",
    "resilient_checkpoint_age_limit_seconds",
    "resilient_checkpoint_save_failures",
    "resilient_heartbeat_age_limit_seconds",
    "resilient_sdc_findings",
    "resilient_checkpoint_interval_steps",
    "resilient_restarts",
    "resilient_failures",
    "resilient_gpu_temperature_celsius",
    "resilient_gpu_power_watts",
    "resilient_gpu_ecc_uncorrectable_errors",
    "resilient_gpu_last_xid",
    "resilient_gpu_row_remap_pending",
    "resilient_gpu_row_remap_failed",
    "resilient_gpu_throttle_active",
    "resilient_gpu_lost",
    "resilient_health_check_severity",
    "resilient_node_health_severity",
    "resilient_collective_bus_bandwidth_bytes_per_second",
    "resilient_goodput_ratio",
    "resilient_productive_seconds",
    "resilient_run_wall_seconds",
    "resilient_badput_seconds",
}


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}} from a real HTTP GET of /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple, float]] = {"__families__": {}}
    for family in text_string_to_metric_families(text):
        out["__families__"][(family.name,)] = 1.0
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    want = tuple(sorted({"node": NODE, **labels}.items()))
    return samples[name][want]


def test_port_zero_binds_an_ephemeral_loopback_port(exporter):
    metrics, port = exporter
    assert port > 0
    assert metrics._server.server_address[0] == "127.0.0.1"


def test_families_appear_with_sane_values_after_heartbeats(exporter):
    metrics, port = exporter
    fed_from = time.time()
    feeder = Feeder(metrics)
    feeder.prime()
    for _ in range(11):
        feeder.advance()  # steps 2..12, a checkpoint at step 10
    first = scrape(port)
    scraped_by = time.time()
    assert FAMILIES <= {name for (name,) in first["__families__"]}
    assert one(first, "resilient_run_state", state="running") == 1
    assert one(first, "resilient_step") == 12
    assert one(first, "resilient_rank_step", rank="1") == 12
    assert one(first, "resilient_tokens_per_second") > 0
    assert 0 < one(first, "resilient_mfu_ratio") <= 1
    assert one(first, "resilient_consumed_tokens") == 12 * 8192
    assert one(first, "resilient_validation_loss") == 3.9
    # One step-time observation per rank per step: 2 ranks x 12 steps.
    assert one(first, "resilient_step_time_seconds_count") == 24
    assert one(first, "resilient_step_time_seconds_sum") == pytest.approx(12 * (0.4 + 0.5))
    # The checkpoint at step 10 was reported by both ranks and counted once.
    assert one(first, "resilient_checkpoint_save_blocking_seconds_count") == 1
    assert one(first, "resilient_checkpoint_last_step") == 10
    assert one(first, "resilient_checkpoint_written_bytes_total") == 1 << 20
    assert 0 <= one(first, "resilient_checkpoint_last_complete_age_seconds") <= scraped_by - fed_from  # fed here
    assert one(first, "resilient_checkpoint_save_failures_total") == 0
    assert one(first, "resilient_sdc_findings_total") == 1
    assert one(first, "resilient_restarts_total") == 1
    assert one(first, "resilient_failures_total", kind="rank_exit") == 1
    assert one(first, "resilient_heartbeat_age_seconds", rank="0") == pytest.approx(0.2)
    assert one(first, "resilient_straggler_score", rank="1") == 1.25
    assert one(first, "resilient_gpu_temperature_celsius", gpu="1") == 91
    assert one(first, "resilient_gpu_last_xid", gpu="1") == 79
    assert one(first, "resilient_gpu_throttle_active", gpu="1", reason="hw_thermal") == 1
    assert one(first, "resilient_gpu_throttle_active", gpu="0", reason="hw_thermal") == 0
    assert one(first, "resilient_gpu_lost", gpu="0") == 0
    assert one(first, "resilient_health_check_severity", check="node.disk") == 1
    assert one(first, "resilient_node_health_severity") == 2
    assert one(first, "resilient_collective_bus_bandwidth_bytes_per_second") == 180e9
    assert one(first, "resilient_goodput_ratio") == pytest.approx(12 * 0.4 / 100, rel=0.05)
    assert one(first, "resilient_run_wall_seconds") == pytest.approx(100, abs=1)
    assert one(first, "resilient_badput_seconds", category="startup") == 5

    for _ in range(3):
        feeder.advance()
    second = scrape(port)
    assert one(second, "resilient_step") == 15 > one(first, "resilient_step")
    assert one(second, "resilient_step_time_seconds_count") == 30


def test_spare_nodes_bad_nodes_and_replacements(exporter):
    metrics, port = exporter
    metrics.on_roster(1, 0, 1)
    assert (one(scrape(port), "resilient_spare_nodes_available"), one(scrape(port), "resilient_bad_nodes")) == (1, 0)
    metrics.on_roster(0, 1, 1)  # a spare took a failed node's place
    metrics.on_replacement()
    after = scrape(port)
    assert one(after, "resilient_spare_nodes_available") == 0 and one(after, "resilient_bad_nodes") == 1
    assert one(after, "resilient_spare_nodes_configured") == 1 and one(after, "resilient_node_replacements_total") == 1


def test_new_attempt_clears_rank_series_and_moves_state(exporter):
    metrics, port = exporter
    metrics.set_state("running", 0)
    metrics.on_heartbeat(3, 1, heartbeat(3, 40))
    metrics.heartbeat_age(3, 2.0)
    metrics.set_state("restarting", 1)
    samples = scrape(port)
    assert one(samples, "resilient_run_state", state="running") == 0
    assert one(samples, "resilient_run_state", state="restarting") == 1
    assert one(samples, "resilient_attempt") == 1
    assert "resilient_heartbeat_age_seconds" not in samples
    assert "resilient_rank_step" not in samples
    metrics.on_heartbeat(3, 1, heartbeat(3, 30))  # resumed from an older checkpoint
    assert one(scrape(port), "resilient_step") == 30


def test_malformed_heartbeat_fields_are_ignored(exporter):
    metrics, port = exporter
    metrics.on_heartbeat(
        0, 0, {"phase": "step", "step": "seven", "loss": "nan?", "tokens_per_s": None, "ckpt_step": True, "mfu": [1]}
    )
    metrics.on_heartbeat(0, 0, {"phase": "step", "step": 5, "loss": float("nan"), "step_time": 0.5})
    samples = scrape(port)
    assert one(samples, "resilient_step") == 5
    assert math.isnan(one(samples, "resilient_loss"))  # NaN is exported: the LossNaN alert needs it
    assert "resilient_tokens_per_second" not in samples


def test_a_non_finite_loss_leaves_its_time_after_the_next_finite_one():
    now = [1000.0]
    metrics = NodeMetrics(MetricsConfig(port=0), NODE, clock=lambda: now[0])
    ts = lambda: metrics.registry.get_sample_value("resilient_loss_nonfinite_timestamp_seconds", {"node": NODE})  # noqa: E731
    metrics.on_heartbeat(0, 0, heartbeat(0, 4))
    assert ts() is None
    metrics.on_heartbeat(0, 0, {**heartbeat(0, 5), "loss": float("inf")})
    now[0] = 1001.0
    metrics.on_heartbeat(0, 0, heartbeat(0, 6))  # the trainer rolled back: the gauge is finite again
    assert ts() == 1000.0 and metrics.registry.get_sample_value("resilient_loss", {"node": NODE}) < 10


def test_checkpoint_age_is_nan_until_a_checkpoint_is_known_then_follows_the_clock():
    now = [1000.0]
    metrics = NodeMetrics(MetricsConfig(port=0), NODE, clock=lambda: now[0])
    metrics.set_state("running", 0)

    def age() -> float:
        return metrics.registry.get_sample_value("resilient_checkpoint_last_complete_age_seconds", {"node": NODE})

    assert math.isnan(age())
    metrics.on_heartbeat(
        0,
        0,
        {
            "phase": "checkpoint",
            "step": 10,
            "ckpt_step": 10,
            "ckpt_blocking_s": 0.2,
            "ckpt_total_s": 2.0,
            "ckpt_bytes": 100,
        },
    )
    now[0] = 1030.0
    assert age() == 30.0


def test_checkpoint_interval_gauge_per_known_tier_only():
    metrics = NodeMetrics(MetricsConfig(port=0), NODE)
    metrics.on_heartbeat(0, 0, heartbeat(0, 5, ckpt_intervals={"disk": 37, "memory": 4, "step 5": 1}))

    def interval(tier: str) -> float | None:
        return metrics.registry.get_sample_value("resilient_checkpoint_interval_steps", {"node": NODE, "tier": tier})

    assert (interval("disk"), interval("memory"), interval("step 5")) == (37.0, 4.0, None)
    metrics.on_heartbeat(0, 0, heartbeat(0, 6, ckpt_intervals={"disk": 52}))
    assert interval("disk") == 52.0


def test_throttle_flags_from_bitmask_or_names():
    assert throttle_flags(0x40 | 0x4) == {
        "sw_power_cap": 1,
        "hw_slowdown": 0,
        "sw_thermal": 0,
        "hw_thermal": 1,
        "hw_power_brake": 0,
    }
    assert throttle_flags(["sw_thermal"])["sw_thermal"] == 1
    assert sum(throttle_flags(None).values()) == 0
