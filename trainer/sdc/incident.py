"""The evidence of a silent-data-corruption finding: RUN_DIR/incidents/<attempt>-sdc/.

summary.json: the ledger record's fields plus every rank's digest at the mismatching check (and after a
re-execution), the parameters whose bits differ, and the re-execution's outcome; summary.txt: the same
for a person. Writing never raises: evidence must not break recovery.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resilient.core.atomic import atomic_write
from resilient.core.rundir import RunDir

if TYPE_CHECKING:
    from trainer.sdc.guard import Check
    from trainer.sdc.replicas import Topology

log = logging.getLogger(__name__)


def write(
    run_dir: Path,
    attempt: int,
    fields: dict[str, Any],
    check: Check | None,
    reexecution: dict[str, Any] | None,
    topology: Topology,
) -> str | None:
    """Write the incident; returns its directory relative to the run dir (None if writing failed)."""
    out = RunDir(run_dir).incidents / f"{attempt}-sdc"
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        summary = {
            **fields,
            "created_at": time.time(),
            "reexecution": reexecution,
            "ranks_layout": [
                {
                    "rank": r,
                    "node": topology.node_names[r],
                    "position": topology.positions[r],
                    "replica": topology.replicas[r],
                }
                for r in range(len(topology.nodes))
            ],
        }
        if check is not None:
            summary["check"] = {
                "step": check.step,
                "digests": [f"{d & (2**64 - 1):016x}" for d in check.digests],
                "verdict": check.verdict.reason,
                "differing_parameters": check.differing,
            }
        atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=str), durable=False)
        atomic_write(out / "summary.txt", _text(summary).encode(), durable=False)
    except OSError as err:
        log.error("could not write the silent-data-corruption incident: %s", err)
        return None
    return str(out.relative_to(run_dir))


def _text(s: dict[str, Any]) -> str:
    named = f"rank(s) {', '.join(map(str, s['ranks']))} on {', '.join(s['nodes'])}" if s["ranks"] else "no rank"
    lines = [
        f"silent data corruption ({s['kind']}) found at step {s['step']} by {s['how']}: {named}",
        f"reason: {s['reason']}",
        f"state trusted up to step {s['trusted_until']}; action: {s['action']}; withdrawn: {s['withdrawn']}",
    ]
    if s.get("check"):
        check = s["check"]
        lines.append(f"check at step {check['step']}: {check['verdict']}")
        lines += [f"  rank {r}: digest {d}" for r, d in enumerate(check["digests"])]
        lines += [
            f"  rank {r}: parameters differing: {', '.join(names)}"
            for r, names in sorted(check["differing_parameters"].items())
        ]
    if s.get("reexecution"):
        lines.append(f"re-execution: {json.dumps(s['reexecution'])}")
    return "\n".join(lines) + "\n"
