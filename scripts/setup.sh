#!/usr/bin/env bash
# Install resilient into the current Python (activate a venv first if you want one).
#   bash scripts/setup.sh          runtime: torch (CPU build), megatron-core, the package
#   bash scripts/setup.sh --test   + test tools and the Debian packages the tests start for real
#                                    (slurmctld/slurmd/munge, prometheus/promtool/node-exporter, chromium), and a
#                                    second environment with the current megatron-core line
#                                    (.venv/mcore-current, see tests/mcore.py)
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
  command -v prometheus-node-exporter >/dev/null || need+=(prometheus-node-exporter)  # serves node facts
  command -v chromium >/dev/null || need+=(chromium)  # renders `resilient report` in tests
  if (( ${#need[@]} )); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${need[@]}"
  fi
  # The current megatron-core line next to 0.16.1: the tests run the trainer and Megatron-LM's own loop
  # on both. It requires Python >= 3.12; on this 3.11 it installs from its source distribution (one small
  # C++ helper is built) and shares everything else with the main environment.
  current=.venv/mcore-current
  [[ -x $current/bin/python ]] || "$PY" -m venv --system-site-packages "$current"
  # (einops: Megatron-FSDP's device mesh, for the fsdp_dtensor checkpoint test)
  "$current/bin/python" -m pip install --quiet --ignore-requires-python --no-deps \
    "megatron-core==${MCORE_CURRENT:-0.19.2}" "triton==3.9.0" "einops==0.8.2"
  # megatron.training uses typing.override (3.12); on 3.11 this test environment alone provides it, for
  # every interpreter of the environment (megatron's checkpoint writer spawns fresh ones).
  site=$("$current/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "import typing; typing.override = getattr(typing, 'override', lambda method: method)" \
    > "$site/resilient_py311_typing_override.pth"
else
  "$PY" -m pip install --quiet -e .
fi
