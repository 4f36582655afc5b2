#!/usr/bin/env bash
# A Slurm cluster of N nodes on this one machine, for tests and for trying `resilient launch`.
#
#   [CLUSTER_NODES=3] [CLUSTER_NETNS=1] deploy/slurm/cluster.sh start STATE_DIR
#                              # munged + slurmctld + slurmd n0..n{N-1}; waits until every node is idle
#   deploy/slurm/cluster.sh status STATE_DIR
#   deploy/slurm/cluster.sh stop   STATE_DIR   # cancels jobs, stops every process it started, removes the namespaces
#   deploy/slurm/cluster.sh freeze STATE_DIR nK  # SIGSTOP every process of node nK (slurmd, job steps, ranks)
#   deploy/slurm/cluster.sh thaw   STATE_DIR nK  # SIGCONT them
#   deploy/slurm/cluster.sh cut    STATE_DIR nK  # (namespaces) take nK's link down: no FIN, no RST, silence
#   deploy/slurm/cluster.sh heal   STATE_DIR nK  # bring it back
#   deploy/slurm/cluster.sh pids   STATE_DIR nK  # the processes of node nK, one per line
#   deploy/slurm/cluster.sh exec   STATE_DIR nK CMD...  # run CMD as on node nK (its network and /dev/shm)
#
# CLUSTER_NODES (default 2) and CLUSTER_NETNS (default 0) are read at start and kept in STATE_DIR.
# With CLUSTER_NETNS=1 every node is a host of its own: a network namespace with its own address on a
# private bridge (10.x.y.0/24, nothing leaves the machine) and its own /dev/shm; the node names resolve
# to those addresses inside the namespaces (/etc/netns/NAME/hosts). Without it every node is 127.0.0.1.
# Then `export SLURM_CONF=STATE_DIR/slurm.conf` and use sbatch/squeue/sinfo as usual.
# Everything (munge key and socket, config, spool, logs, controller state) lives under STATE_DIR;
# ports are picked free once and kept in STATE_DIR/ports. Needs root (slurmd runs jobs as their user);
# start adds "127.0.0.1 n0 n1 ..." to /etc/hosts when those names do not resolve.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WAIT_IDLE_S="${CLUSTER_WAIT_IDLE_S:-90}"

die() { echo "cluster.sh: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || die "usage: cluster.sh start|stop|status|freeze|thaw|cut|heal|pids|exec STATE_DIR [NODE [CMD...]]"
ACTION="$1"
mkdir -p "$2"
STATE="$(cd "$2" && pwd)"
shift 2
CONF="$STATE/slurm.conf"
# Every daemon started here carries this marker in its environment; `stop` finds them by it.
MARKER="RESILIENT_LOCAL_CLUSTER=$STATE"
export SLURM_CONF="$CONF"

# The shape is fixed at the first start and read back by every other action.
if [[ "$ACTION" == start && ! -s "$STATE/cluster.env" ]]; then
    count="${CLUSTER_NODES:-2}"
    [[ "$count" =~ ^[1-9][0-9]?$ ]] || die "CLUSTER_NODES=$count: a node count from 1 to 99"
    printf 'NODE_COUNT=%s\nNETNS=%s\n' "$count" "${CLUSTER_NETNS:-0}" > "$STATE/cluster.env"
fi
NODE_COUNT=2
NETNS=0
# shellcheck disable=SC1091
[[ -s "$STATE/cluster.env" ]] && source "$STATE/cluster.env"
NODES=()
for ((k = 0; k < NODE_COUNT; k++)); do NODES+=("n$k"); done

# Names of this cluster's namespaces, bridge and links: derived from STATE_DIR, so clusters of
# several test sessions never collide (interface names are at most 15 characters).
TAG="$(printf '%s' "$STATE" | sha1sum | cut -c1-6)"
NET="10.$((200 + 0x${TAG:0:2} % 50)).$((0x${TAG:2:2} % 250)).0"
NET="${NET%.0}"
BRIDGE="rsb$TAG"
netns_of() { echo "rs${TAG}${1}"; }          # n1 -> rs<tag>n1
link_of() { echo "rsv${TAG}${1#n}"; }        # host side of node n1's veth
addr_of() { if ((NETNS)); then echo "$NET.$((10 + ${1#n}))"; else echo 127.0.0.1; fi; }
CTLD_ADDR=127.0.0.1
((NETNS)) && CTLD_ADDR="$NET.1"

pid_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

munge_running() { pid_alive "$STATE/run/munged.pid"; }
ctld_running() { pid_alive "$STATE/run/slurmctld.pid"; }
slurmd_running() { pid_alive "$STATE/run/slurmd-$1.pid"; }

known_node() {
    local n
    for n in "${NODES[@]}"; do [[ "$n" == "$1" ]] && return 0; done
    die "no node '$1' in this cluster (${NODES[*]})"
}

free_ports() {  # N free TCP ports, consecutive
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
        free_ports $((1 + NODE_COUNT)) > "$STATE/ports"
    fi
    local ports node_lines="" k
    read -r -a ports < "$STATE/ports"
    for ((k = 0; k < NODE_COUNT; k++)); do
        node_lines+="NodeName=n$k NodeHostname=$(hostname -s) NodeAddr=$(addr_of "n$k") Port=${ports[$((k + 1))]} "
        node_lines+="CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=4000 State=UNKNOWN"$'\n'
    done
    sed -e "s|@STATE_DIR@|$STATE|g" -e "s|@HOST@|$(hostname -s)|g" -e "s|@CTLD_ADDR@|$CTLD_ADDR|g" \
        -e "s|@CTLD_PORT@|${ports[0]}|g" -e "s|@NODES@|n[0-$((NODE_COUNT - 1))]|g" \
        "$HERE/slurm.conf.in" | NODE_LINES="$node_lines" awk '$0 == "@NODE_LINES@" {printf "%s", ENVIRON["NODE_LINES"]; next} {print}' > "$CONF.tmp"
    chmod 0644 "$CONF.tmp"  # slurmstepd and client commands running as the job user read it
    mv "$CONF.tmp" "$CONF"
}

# The supervisors reach each other by Slurm node name.
ensure_node_names_resolve() {
    local n
    for n in "${NODES[@]}"; do
        getent hosts "$n" > /dev/null && continue
        echo "127.0.0.1 ${NODES[*]}  # resilient local Slurm test cluster (deploy/slurm/cluster.sh)" >> /etc/hosts
        return
    done
}

# One namespace per node on a bridge of its own; inside, the node names resolve to the bridge addresses.
start_netns() {
    ip link show "$BRIDGE" > /dev/null 2>&1 || {
        ip link add "$BRIDGE" type bridge
        ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
        ip link set "$BRIDGE" up
    }
    local n m ns hosts
    for n in "${NODES[@]}"; do
        ns="$(netns_of "$n")"
        # As on a real host: this machine's name is the node's own address (gloo binds what it resolves to).
        hosts="127.0.0.1 localhost"$'\n'"$(addr_of "$n") $(hostname -s)"$'\n'
        for m in "${NODES[@]}"; do hosts+="$(addr_of "$m") $m"$'\n'; done
        mkdir -p "/etc/netns/$ns"
        printf '%s' "$hosts" > "/etc/netns/$ns/hosts"
        ip netns list | grep -qw "$ns" && continue
        ip netns add "$ns"
        ip link add "$(link_of "$n")" type veth peer name eth0 netns "$ns"
        ip link set "$(link_of "$n")" master "$BRIDGE" up
        ip netns exec "$ns" ip addr add "$(addr_of "$n")/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
        ip netns exec "$ns" ip link set lo up
    done
}

stop_netns() {
    ((NETNS)) || return 0
    local n ns
    for n in "${NODES[@]}"; do
        ns="$(netns_of "$n")"
        ip netns del "$ns" 2>/dev/null || true
        ip link del "$(link_of "$n")" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
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
    local n
    for n in "${NODES[@]}"; do
        mkdir -p -m 0700 "$STATE/spool/$n"
        slurmd_running "$n" && continue
        if ((NETNS)); then
            # The node's network namespace and a mount namespace of its own: its /etc/hosts and a private
            # /dev/shm (not `ip netns exec`: it remounts /sys, and slurmd needs the host's cgroup mount).
            nsenter --net="/run/netns/$(netns_of "$n")" unshare --mount --propagation slave sh -c \
                'mount --bind "$1" /etc/hosts && mount -t tmpfs -o mode=1777 tmpfs /dev/shm &&
                 exec env "$2" slurmd -f "$3" -N "$4"' \
                - "/etc/netns/$(netns_of "$n")/hosts" "$MARKER" "$CONF" "$n"
        else
            env "$MARKER" slurmd -f "$CONF" -N "$n"
        fi
    done
}

wait_idle() {
    local deadline=$((SECONDS + WAIT_IDLE_S)) states="" want="" n
    for n in "${NODES[@]}"; do want+="$n=idle "; done
    while ((SECONDS < deadline)); do
        states="$(sinfo -h -N -p main -o '%N=%t' 2>/dev/null | sort -V | tr '\n' ' ' || true)"
        [[ "$states" == "$want" ]] && { echo "cluster up: $states(SLURM_CONF=$CONF)"; return 0; }
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

# Every process of one node: with namespaces, whatever runs in its namespace; without, its slurmd,
# the job processes Slurm started there (SLURMD_NODENAME) and the slurmstepds above them.
node_pids() {
    local n="$1" f pid env
    if ((NETNS)); then
        ip netns pids "$(netns_of "$n")"
        return
    fi
    [[ -s "$STATE/run/slurmd-$n.pid" ]] && cat "$STATE/run/slurmd-$n.pid"
    for f in /proc/[0-9]*/environ; do
        pid="${f#/proc/}"; pid="${pid%/environ}"
        env="$(tr '\0' '\n' 2>/dev/null < "$f")" || continue
        grep -qxF "SLURM_CONF=$CONF" <<< "$env" && grep -qxF "SLURMD_NODENAME=$n" <<< "$env" || continue
        echo "$pid"
        local parent
        parent="$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null)" || continue
        [[ "$(cat "/proc/$parent/comm" 2>/dev/null)" == slurmstepd ]] && echo "$parent"
    done | sort -u
}

stop_all() {
    if ctld_running; then
        scancel --full --quiet --signal=KILL --user="$(id -un)" 2>/dev/null || true
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
    fi
    local pids deadline
    pids="$(cluster_pids)"
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -CONT $pids 2>/dev/null || true  # a frozen node must be able to die
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -TERM $pids 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while [[ -n "$pids" ]] && ((SECONDS < deadline)); do
        sleep 0.5
        pids="$(cluster_pids)"
    done
    # shellcheck disable=SC2086
    [[ -n "$pids" ]] && kill -KILL $pids 2>/dev/null || true
    rm -f "$STATE"/run/*.pid
    stop_netns
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

signal_node() {
    known_node "$1"
    local pids
    pids="$(node_pids "$1")"
    [[ -n "$pids" ]] || die "no process of node $1"
    # shellcheck disable=SC2086
    kill "-$2" $pids
    echo "$2 sent to $(wc -w <<< "$pids") process(es) of $1"
}

set_link() {
    known_node "$1"
    ((NETNS)) || die "$ACTION needs a cluster started with CLUSTER_NETNS=1"
    ip link set "$(link_of "$1")" "$2"
    echo "$1: link $2"
}

case "$ACTION" in
    start)
        command -v slurmctld > /dev/null || die "slurmctld not installed (apt-get install slurm-wlm munge)"
        install -d -m 0711 "$STATE/munge"
        install -d -m 0700 "$STATE/run" "$STATE/ctld" "$STATE/spool"
        install -d -m 0755 "$STATE/log" "$STATE/tmp"
        render_config
        if ((NETNS)); then start_netns; else ensure_node_names_resolve; fi
        start_munge
        start_slurm
        wait_idle
        ;;
    stop) stop_all ;;
    status) status ;;
    freeze) [[ $# -eq 1 ]] || die "usage: freeze STATE_DIR NODE"; signal_node "$1" STOP ;;
    thaw) [[ $# -eq 1 ]] || die "usage: thaw STATE_DIR NODE"; signal_node "$1" CONT ;;
    cut) [[ $# -eq 1 ]] || die "usage: cut STATE_DIR NODE"; set_link "$1" down ;;
    heal) [[ $# -eq 1 ]] || die "usage: heal STATE_DIR NODE"; set_link "$1" up ;;
    pids) [[ $# -eq 1 ]] || die "usage: pids STATE_DIR NODE"; known_node "$1"; node_pids "$1" ;;
    exec)
        [[ $# -ge 2 ]] || die "usage: exec STATE_DIR NODE CMD..."
        known_node "$1"
        node="$1"; shift
        if ((NETNS)); then
            exec nsenter --target "$(cat "$STATE/run/slurmd-$node.pid")" --net --mount -- "$@"
        fi
        exec "$@"
        ;;
    *) die "unknown action '$ACTION' (start|stop|status|freeze|thaw|cut|heal|pids|exec)" ;;
esac
