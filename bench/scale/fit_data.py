"""Store bench/scale's restart fits as the planner's data: python bench/scale/fit_data.py bench/results/scale.json"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from resilient.planner import RESTART_COORDINATION_FIT  # noqa: E402


def main() -> None:
    result = json.loads(Path(sys.argv[1]).read_text())
    data = {
        "source": f"bench/scale/run.py, {date.today().isoformat()}, simulated nodes on a shared 2-core machine",
        "nodes_measured": [r["nodes"] for r in result["rows"]],
        "fits": {k: result["fits"][k] for k in ("fail_to_stop_s", "decide_to_go_s")},
    }
    RESTART_COORDINATION_FIT.write_text(json.dumps(data, indent=1) + "\n")
    print(RESTART_COORDINATION_FIT.read_text())


if __name__ == "__main__":
    main()
