"""GPU health rules: pure functions of (previous sample, current sample, config) -> CheckResult.

Growth rules (PCIe replays, NVLink errors) need a previous sample; without one they record a baseline
and pass. The rules other than the device count assume a readable sample: `evaluate` reports an
unreadable one (no NVML) as a single skipped result, or as fatal when a GPU count is expected.
"""

from __future__ import annotations

from collections.abc import Callable

from health.config import HealthConfig
from health.gpu.state import DeviceState, GpuSample
from health.types import CheckResult, Severity, fatal, ok, skipped, warn

Rule = Callable[[GpuSample | None, GpuSample, HealthConfig], CheckResult]


def _gpus(devs: list[DeviceState]) -> str:
    return ", ".join(f"gpu{d.index}" for d in devs)


def device_count(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> CheckResult:
    name, want = "gpu.count", cfg.gpus_per_node
    if not cur.available:
        if want:
            return fatal(name, f"expected {want} GPUs but cannot read them: {cur.reason}", expected=want)
        return skipped(name, cur.reason)
    if want is None:
        return ok(name, f"{cur.count} GPUs (no expected count configured)", count=cur.count)
    if cur.count < want:
        return fatal(name, f"{cur.count} GPUs visible, expected {want}", count=cur.count, expected=want)
    if cur.count > want:
        return warn(name, f"{cur.count} GPUs visible, expected only {want}", count=cur.count, expected=want)
    return ok(name, f"{cur.count} GPUs as expected", count=cur.count, expected=want)


def gpu_lost(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> CheckResult:
    name = "gpu.lost"
    lost = [d for d in cur.devices if d.lost]
    if lost:
        return fatal(name, f"{_gpus(lost)} lost (NVML_ERROR_GPU_IS_LOST)", gpus=[d.index for d in lost])
    return ok(name, "no GPU lost")


def xid(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> CheckResult:
    name = "gpu.xid"
    ignore = set(cfg.xid_ignore)
    critical = {d.index: [x for x in d.xids if x not in ignore] for d in cur.devices}
    critical = {i: xs for i, xs in critical.items() if xs}
    seen = {d.index: d.xids for d in cur.devices if d.xids}
    if critical:
        what = "; ".join(f"XID {', '.join(map(str, xs))} on gpu{i}" for i, xs in critical.items())
        return fatal(name, f"critical {what}", xids=seen)
    if seen:
        what = "; ".join(f"XID {', '.join(map(str, xs))} on gpu{i}" for i, xs in seen.items())
        return ok(name, f"only application XIDs ({what}), ignored", xids=seen)
    return ok(name, "no XID events")


def ecc(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> CheckResult:
    name = "gpu.ecc"
    counts = {d.index: d.ecc_uncorrected for d in cur.devices if d.ecc_uncorrected is not None}
    bad = {i: n for i, n in counts.items() if n > 0}
    if bad:
        what = ", ".join(f"{n} on gpu{i}" for i, n in bad.items())
        return fatal(name, f"uncorrectable ECC errors since driver load: {what}", uncorrected=counts)
    if not counts:
        return skipped(name, "ECC counters not supported")
    return ok(name, "no uncorrectable ECC errors", uncorrected=counts)


def row_remap(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> CheckResult:
    name = "gpu.row_remap"
    failed = [d for d in cur.devices if d.remap_failed]
    pending = [d for d in cur.devices if d.remap_pending]
    retired = [d for d in cur.devices if d.retired_pages_pending]
    problems = []
    if failed:
        problems.append(f"row remapping failed on {_gpus(failed)} (replace the GPU)")
    if pending:
        problems.append(f"row remapping pending on {_gpus(pending)} (GPU reset needed)")
    if retired:
        problems.append(f"page retirement pending on {_gpus(retired)} (reboot needed)")
    values = {
        "failed": [d.index for d in failed],
        "pending": [d.index for d in pending],
        "retired_pending": [d.index for d in retired],
    }
    if problems:
        return fatal(name, "; ".join(problems), **values)
    known = any(d.remap_pending is not None or d.retired_pages_pending is not None for d in cur.devices)
    if not known:
        return skipped(name, "row remapping and page retirement not supported")
    return ok(name, "no pending or failed row remapping", **values)


def throttle(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> CheckResult:
    name = "gpu.throttle"
    active = {d.index: d.throttle for d in cur.devices if d.throttle}
    if active:
        what = "; ".join(f"gpu{i}: {', '.join(rs)}" for i, rs in active.items())
        severity = Severity.FATAL if cfg.throttle_severity == "fatal" else Severity.WARN
        return CheckResult(name, severity, f"hardware clock throttling ({what})", {"throttle": active})
    return ok(name, "no hardware clock throttling")


def temperature(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> CheckResult:
    name = "gpu.temperature"
    temps = {d.index: d.temperature_c for d in cur.devices if d.temperature_c is not None}
    if not temps:
        return skipped(name, "temperature not reported")
    hottest = max(temps, key=temps.__getitem__)
    t = temps[hottest]
    if t >= cfg.temp_fatal_c:
        return fatal(name, f"gpu{hottest} at {t} C (limit {cfg.temp_fatal_c} C)", celsius=temps)
    if t >= cfg.temp_warn_c:
        return warn(name, f"gpu{hottest} at {t} C (warning at {cfg.temp_warn_c} C)", celsius=temps)
    return ok(name, f"hottest gpu{hottest} at {t} C", celsius=temps)


def _growth_rule(name: str, field: str, what: str, warn_attr: str, fatal_attr: str) -> Rule:
    def rule(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> CheckResult:
        now = {d.index: getattr(d, field) for d in cur.devices if getattr(d, field) is not None}
        if not now:
            return skipped(name, f"{what} not reported")
        before = (
            {}
            if prev is None or not prev.available
            else {d.index: getattr(d, field) for d in prev.devices if getattr(d, field) is not None}
        )
        growth = {i: now[i] - before[i] for i in now if i in before}
        if not growth:
            return ok(name, f"{what}: baseline recorded", counters=now)
        worst = max(growth, key=growth.__getitem__)
        g, lim_warn, lim_fatal = growth[worst], getattr(cfg, warn_attr), getattr(cfg, fatal_attr)
        if g >= lim_fatal:
            return fatal(name, f"{what} grew by {g} on gpu{worst} (limit {lim_fatal})", growth=growth, counters=now)
        if g >= lim_warn:
            return warn(name, f"{what} grew by {g} on gpu{worst} (warning at {lim_warn})", growth=growth, counters=now)
        return ok(name, f"{what} growth at most {g}", growth=growth, counters=now)

    rule.__name__ = field
    return rule


pcie_replay = _growth_rule(
    "gpu.pcie_replay", "pcie_replay", "PCIe replay counter", "pcie_replay_growth_warn", "pcie_replay_growth_fatal"
)
nvlink_errors = _growth_rule(
    "gpu.nvlink", "nvlink_errors", "NVLink error counters", "nvlink_error_growth_warn", "nvlink_error_growth_fatal"
)

RULES: tuple[Rule, ...] = (
    device_count,
    gpu_lost,
    xid,
    ecc,
    row_remap,
    throttle,
    temperature,
    pcie_replay,
    nvlink_errors,
)


def evaluate(prev: GpuSample | None, cur: GpuSample, cfg: HealthConfig) -> list[CheckResult]:
    """Every GPU rule on one pair of samples."""
    if not cur.available:
        if cfg.gpus_per_node:
            return [device_count(prev, cur, cfg)]
        return [skipped("gpu", f"{cur.reason}; not checked: {', '.join(r.__name__ for r in RULES)}")]
    return [*(rule(prev, cur, cfg) for rule in RULES), telemetry(cur)]


def telemetry(cur: GpuSample) -> CheckResult:
    """Not a rule: each GPU's raw readings, for the metrics exporter and `health check --json`."""
    gpus = {
        dev.index: {
            "temperature_c": dev.temperature_c,
            "power_w": dev.power_w,
            "ecc_uncorrectable": dev.ecc_uncorrected,
            "last_xid": dev.xids[-1] if dev.xids else 0,
            "remap_pending": dev.remap_pending,
            "remap_failed": dev.remap_failed,
            "lost": dev.lost,
            "throttle_reasons": list(dev.throttle),
        }
        for dev in cur.devices
    }
    return CheckResult("gpu.telemetry", Severity.OK, f"{len(gpus)} GPU(s) read", {"gpus": gpus})
