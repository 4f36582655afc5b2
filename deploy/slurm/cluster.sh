#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for tests and for trying `resilient launch`.
#
#   deploy/slurm/cluster.sh start  STATE_DIR   # munged + slurmctld + slurmd n0,n1; waits until both are idle
#   deploy/slurm/cluster.sh status STATE_DIR
#   deploy/slurm/cluster.sh stop   STATE_DIR   # cancels jobs, stops every process it started
#
# Then `export SLURM_CONF=STATE_DIR/slurm.conf` and use sbatch/squeue/sinfo as usual.
# Everything (munge key and socket, config, spool, logs, controller state) lives under STATE_DIR;
# ports are picked free once and kept in STATE_DIR/ports. Needs root (slurmd runs jobs as their user);
# start adds "127.0.0.1 n0 n1" to /etc/hosts when those names do not resolve.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WAIT_IDLE_S="${CLUSTER_WAIT_IDLE_S:-90}"
NODES=(n0 n1)

die() { echo "cluster.sh: $*" >&2; exit 1; }

[[ $# -eq 2 ]] || die "usage: cluster.sh start|stop|status STATE_DIR"
ACTION="$1"
mkdir -p "$2"
STATE="$(cd "$2" && pwd)"
CONF="$STATE/slurm.conf"
# Every daemon started here carries this marker in its environment; `stop` finds them by it.
MARKER="RESILIENT_LOCAL_CLUSTER=$STATE"
export SLURM_CONF="$CONF"

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_running() { pid_alive "$STATE/run/munged.pid"; }
ctld_running() { pid_alive "$STATE/run/slurmctld.pid"; }
slurmd_running() { pid_alive "$STATE/run/slurmd-$1.pid"; }

free_ports() {  # N free TCP ports on loopback, consecutive for the slurmd range
    python3 - "$1" <<'EOF'
import socket, sys
n = int(sys.argv[1])
for base in range(20000, 60000, 97):
    socks = []
    try:
        for p in range(base, base + n):
            s = socket.socket(); s.bind(("0.0.0.0", p)); socks.append(s)
        print(" ".join(str(p) for p in range(base, base + n))); break
    except OSError:
        pass
    finally:
        for s in socks: s.close()
EOF
}

render_config() {
    if [[ ! -s "$STATE/ports" ]]; then
        free_ports 3 > "$STATE/ports"
    fi
    read -r CTLD_PORT NODE_LO NODE_HI < "$STATE/ports"
    sed -e "s|@STATE_DIR@|$STATE|g" -e "s|@HOST@|$(hostname -s)|g" \
        -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@NODE_PORT_LO@|$NODE_LO|g" -e "s|@NODE_PORT_HI@|$NODE_HI|g" \
        "$HERE/slurm.conf.in" > "$CONF.tmp"
    chmod 0644 "$CONF.tmp"  # slurmstepd and client commands running as the job user read it
    mv "$CONF.tmp" "$CONF"
}

# The supervisors reach node 0 by its Slurm node name (first host of SLURM_JOB_NODELIST).
ensure_node_names_resolve() {
    local n
    for n in "${NODES[@]}"; do
        getent hosts "$n" > /dev/null && continue
        echo "127.0.0.1 ${NODES[*]}  # resilient local Slurm test cluster (deploy/slurm/cluster.sh)" >> /etc/hosts
        return
    done
}

start_munge() {
    munge_running && return 0
    if [[ ! -s "$STATE/munge/munge.key" ]]; then
        head -c 1024 /dev/urandom > "$STATE/munge/munge.key"
        chmod 0400 "$STATE/munge/munge.key"
    fi
    env "$MARKER" munged --force \
        --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed"
}

start_slurm() {
    ctld_running || env "$MARKER" slurmctld -f "$CONF"
    for n in "${NODES[@]}"; do
        mkdir -p -m 0700 "$STATE/spool/$n"
        slurmd_running "$n" || env "$MARKER" slurmd -f "$CONF" -N "$n"
    done
}

wait_idle() {
    local deadline=$((SECONDS + WAIT_IDLE_S)) states=""
    while ((SECONDS < deadline)); do
        states="$(sinfo -h -N -p main -o '%N=%t' 2>/dev/null | sort | tr '\n' ' ' || true)"
        [[ "$states" == "n0=idle n1=idle " ]] && { echo "cluster up: $states(SLURM_CONF=$CONF)"; return 0; }
        sleep 1
    done
    die "nodes not idle after ${WAIT_IDLE_S}s: '${states}'; see $STATE/log/"
}

# Pids of every process this cluster started: the daemons (marked), the slurmstepds they forked
# (inherit the marker) and job processes (their environment names this cluster's config).
cluster_pids() {
    local f pid env
    for f in /proc/[0-9]*/environ; do
        pid="${f#/proc/}"; pid="${pid%/environ}"
        [[ "$pid" == "$$" || "$pid" == "$BASHPID" || "$pid" == "$PPID" ]] && continue
        env="$(tr '\0' '\n' 2>/dev/null < "$f")" || continue
        if grep -qxF "$MARKER" <<< "$env" \
            || { grep -q '^SLURM_JOB_ID=' <<< "$env" && grep -qxF "SLURM_CONF=$CONF" <<< "$env"; }; then
            echo "$pid"
        fi
    done
}

stop_all() {
    if ctld_running; then
        scancel --full --quiet --signal=KILL --user="$(id -un)" 2>/dev/null || true
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    local pids deadline
    pids="$(cluster_pids)"
    [[ -z "$pids" ]] && { echo "cluster stopped"; return 0; }
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        pids="$(cluster_pids)"
        [[ -z "$pids" ]] && break
        sleep 0.5
    done
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
    rm -f "$STATE"/run/*.pid
    echo "cluster stopped"
}

status() {
    local name pidfile
    for name in munged slurmctld "${NODES[@]/#/slurmd-}"; do
        pidfile="$STATE/run/$name.pid"
        if pid_alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: stopped"; fi
    done
    if ctld_running; then sinfo -N -o '%N %P %t %E' || true; fi
    ctld_running && munge_running && for n in "${NODES[@]}"; do slurmd_running "$n" || return 1; done
}

case "$ACTION" in
    start)
        command -v slurmctld > /dev/null || die "slurmctld not installed (apt-get install slurm-wlm munge)"
        install -d -m 0711 "$STATE/munge"
        install -d -m 0700 "$STATE/run" "$STATE/ctld" "$STATE/spool"
        install -d -m 0755 "$STATE/log" "$STATE/tmp"
        render_config
        ensure_node_names_resolve
        start_munge
        start_slurm
        wait_idle
        ;;
    stop) stop_all ;;
    status) status ;;
    *) die "unknown action '$ACTION' (start|stop|status)" ;;
esac
