#!/usr/bin/env bash
# A real SLURM on localhost for the launcher tests: munged, slurmctld and two slurmd daemons that
# emulate nodes node1 and node2 on this one machine (the setup in docs/launch.md, "What is
# verified").  Needs root and the Debian packages slurm-wlm and munge.
#
#   launch/testing/slurm_local.sh start DIR [NODES] [CPUS]   print `export SLURM_CONF=...`
#   launch/testing/slurm_local.sh stop DIR
#
# Everything (config, munge key and socket, state, spool, logs) lives under DIR, so a run never
# touches /etc/slurm or the system's munged and several DIRs do not collide.
set -euo pipefail

die() { echo "slurm_local: $*" >&2; exit 1; }

free_port() {  # a TCP port nobody listens on right now
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start() {
    local dir=$1 nodes=${2:-2} cpus=${3:-2}
    for bin in munged slurmctld slurmd scontrol sbatch; do
        command -v "$bin" >/dev/null || die "$bin not found: apt-get install -y slurm-wlm munge"
    done
    [ "$(id -u)" = 0 ] || die "must run as root (slurmd starts jobs as their user)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    mkdir -p "$dir"/{munge,state,log,spool}
    # munged refuses keys and sockets that others can read or write: the munge user owns them.
    chmod 755 "$dir"
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=1024 status=none
    chown -R munge:munge "$dir/munge"
    chmod 700 "$dir/munge"
    chmod 400 "$dir/munge/munge.key"
    runuser -u munge -- test -r "$dir/munge/munge.key" ||
        die "the munge user cannot reach $dir (a parent directory is private): use a DIR under /tmp"
    runuser -u munge -- munged --force \
        --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    chmod 755 "$dir/munge"  # clients (slurm daemons, sbatch) must reach the socket

    local host ctld_port first_port
    host=$(hostname -s)
    ctld_port=$(free_port)
    first_port=$(free_port)
    # MinJobAge=5: a finished job stays visible for at least 5 s (the tests run scontrol show
    # job right after it ends). It also sets how often `sbatch --wait` polls: 2 s apart while
    # MinJobAge / 2 (rounded down) is at most 2, else 2, 8, then 32 s apart. With SLURM's
    # default of 300, each `eurotrain launch --wait` test waited ~30 s after its job had ended.
    cat >"$dir/slurm.conf" <<CONF
ClusterName=eurotrain-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=node[1-$nodes] NodeHostname=$host NodeAddr=127.0.0.1 Port=$first_port-$((first_port + nodes - 1)) CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=node[1-$nodes] Default=YES MaxTime=01:00:00 State=UP OverSubscribe=YES
CONF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    for ((i = 1; i <= nodes; i++)); do
        mkdir -p "$dir/spool/node$i"
        slurmd -f "$SLURM_CONF" -N "node$i"
    done
    # Wait until every node is idle: a job submitted earlier would only pend.
    local idle=0
    for _ in $(seq 60); do
        idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l || true)
        [ "$idle" -ge "$nodes" ] && break
        sleep 0.5
    done
    if [ "$idle" -lt "$nodes" ]; then
        sinfo -N >&2 || true
        tail -n 20 "$dir"/log/*.log >&2 || true
        die "only $idle of $nodes nodes became idle (logs above)"
    fi
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local dir
    dir=$(cd "$1" && pwd)
    export SLURM_CONF=$dir/slurm.conf
    if [ -f "$SLURM_CONF" ]; then
        scancel --quiet --user="$(id -un)" 2>/dev/null || true
        scontrol shutdown 2>/dev/null || true
    fi
    # Wait for the daemons we started (their pid files are ours alone), then stop munged.
    local pidfile pid
    for pidfile in "$dir"/slurmctld.pid "$dir"/slurmd-*.pid "$dir"/munge/munged.pid; do
        [ -f "$pidfile" ] || continue
        pid=$(cat "$pidfile")
        [[ "$pidfile" == *munged.pid ]] && kill "$pid" 2>/dev/null
        for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -9 "$pid" 2>/dev/null || true
    done
}

case "${1:-}" in
    start) shift; [ $# -ge 1 ] || die "usage: $0 start DIR [NODES] [CPUS]"; start "$@" ;;
    stop) shift; [ $# -ge 1 ] || die "usage: $0 stop DIR"; stop "$1" ;;
    *) die "usage: $0 start DIR [NODES] [CPUS] | stop DIR" ;;
esac
