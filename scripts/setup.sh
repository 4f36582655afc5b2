#!/usr/bin/env bash
# Install resilient into the current Python (activate a venv first if you want one).
#   bash scripts/setup.sh          runtime: torch (CPU build), megatron-core, the package
#   bash scripts/setup.sh --test   + test tools and the Debian packages the tests start for real
#                                    (slurmctld/slurmd/munge, prometheus/promtool, chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# torch first and pinned: an unpinned torch drags in a multi-GB CUDA build.
"$PY" -m pip install --quiet "torch==2.13.0"
if [[ "${1:-}" == "--test" ]]; then
  "$PY" -m pip install --quiet -e ".[test]"
  need=()
  command -v slurmctld >/dev/null || need+=(slurm-wlm)
  command -v munged >/dev/null || need+=(munge)
  command -v promtool >/dev/null || need+=(prometheus)
  command -v chromium >/dev/null || need+=(chromium)  # renders `resilient report` in tests
  if (( ${#need[@]} )); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
else
  "$PY" -m pip install --quiet -e .
fi
