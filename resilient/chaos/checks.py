"""What every chaos drill must show: the run finished, its bits, no orphans, every fault seen, goodput."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import psutil


def recomputed_executions(train_log: Iterable[Mapping[str, Any]]) -> tuple[int, float]:
    """(step executions thrown away, their seconds): a step is thrown away when a later record of the same
    step exists (it was computed again after a restart or rollback). Counted walking backwards, apart from
    the goodput module's bookkeeping, so the two can check each other."""
    seen: set[int] = set()
    count, seconds = 0, 0.0
    for rec in reversed([r for r in train_log if "step_time" in r]):
        if rec["step"] in seen:
            count += 1
            seconds += float(rec["step_time"])
        seen.add(rec["step"])
    return count, seconds


def false_alarms(failures: Iterable[Mapping[str, Any]], causes: Iterable[Collection[str]]) -> list[Mapping[str, Any]]:
    """The `failure` records no injected fault explains, in ledger order: each injection explains one failure
    of each kind it may set off (its `causes`), the earliest first."""
    left = Counter(kind for kinds in causes for kind in kinds)
    unexplained = []
    for failure in failures:
        if left[failure["kind"]] > 0:
            left[failure["kind"]] -= 1
        else:
            unexplained.append(failure)
    return unexplained


def run_processes(run_dir: Path, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """Live processes that belong to the run (ranks and their children carry RESILIENT_RUN_DIR)."""
    skip, target, out = set(exclude), str(Path(run_dir).resolve()), []
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        try:
            if proc.environ().get("RESILIENT_RUN_DIR") == target and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def orphans(run_dir: Path, *, wait_s: float, exclude: Iterable[int] = ()) -> list[dict[str, Any]]:
    """Processes of the run still alive after `wait_s` (data-loader workers notice a dead parent within seconds)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = run_processes(run_dir, exclude)
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    out = []
    for proc in left:
        try:
            out.append({"pid": proc.pid, "cmdline": " ".join(proc.cmdline())[:200]})
        except psutil.Error:
            continue
    return out


def verdicts(report: Mapping[str, Any], *, reference_digest: str | None, expect_same_digest: bool) -> dict[str, str]:
    """Failed checks of a drill report, as {check: reason} (empty: passed)."""
    failed: dict[str, str] = {}
    if not report["finished"]:
        failed["finished"] = f"the run did not finish (last supervisor exit {report['exit_codes'][-1:]})"
        if report.get("timed_out"):
            failed["finished"] += f"; the drill timed out: {report['timed_out']}"
    if reference_digest is not None and expect_same_digest and report["digest"] != reference_digest:
        failed["digest"] = f"final digest {report['digest']} differs from the reference {reference_digest}"
    if report["orphans"]:
        failed["orphans"] = f"{len(report['orphans'])} processes of the run outlived it: {report['orphans'][:3]}"
    missed = [f["kind"] for f in report["faults"] if f["detection_latency_s"] is None]
    if missed:
        failed["detected"] = f"faults injected but never seen in the ledger: {missed}"
    if report["false_alarms"]:
        failed["false_alarms"] = "failures no injected fault explains: " + "; ".join(
            f"{f['kind']} ({f['reason']})" for f in report["false_alarms"]
        )
    if report["not_injected"]:
        failed["injected"] = f"faults whose moment never came: {report['not_injected']}"
    gp = report["goodput"]
    if not gp["lost_progress_matches"]:
        failed["lost_progress"] = (
            f"goodput counts {gp['recomputed_steps']} recomputed steps / "
            f"{gp['badput_s']['lost_progress']:.3f}s, the train log shows "
            f"{gp['expected_recomputed_steps']} / {gp['expected_lost_s']:.3f}s"
        )
    return failed
