#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, so that tests/test_slurm.py exercises what a cluster
# really does (sbatch, array jobs through hydra-submitit-launcher, scontrol requeue) instead of a mock.
#
#   bash scripts/slurm_cluster.sh up     # install (if missing), configure and start munge + slurmctld + slurmd
#   bash scripts/slurm_cluster.sh down   # cancel its jobs, stop the daemons it started, clear its job state
#
# Both are idempotent: `up` on a running cluster only waits for the node to be usable (it restarts the
# SLURM daemons when the generated config changed); `down` on a stopped one does nothing. Needs root
# (apt-get, daemons as SlurmUser=root). No cgroups (proctrack/linuxproc, task/none), so it works in a
# container; two 1-CPU jobs run at once (cons_tres, CR_Core_Memory, DefMemPerCPU = memory / CPUs).
#
# Everything it writes: /etc/slurm/slurm.conf (only if absent or written by this script: a site's own
# config is never overwritten), the munge key if missing, and $STATE (default /var/spool/slurm-repopt:
# state, spool, logs, pid files, and the list of daemons it started, which `down` stops by pid).
# Settings (environment): REPOPT_SLURM_DIR (state dir), REPOPT_SLURM_WAIT (seconds to wait for the
# node, default 90), REPOPT_SLURM_MEM_MARGIN_MB (memory not offered to jobs, default 10 % of the total,
# at least 512).
set -euo pipefail

STATE=${REPOPT_SLURM_DIR:-/var/spool/slurm-repopt}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by repopt scripts/slurm_cluster.sh"
WAIT_S=${REPOPT_SLURM_WAIT:-90}
NODE=$(hostname -s)

say() { echo "slurm_cluster: $*" >&2; }

die() {
    say "ERROR: $*"
    for log in "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" /var/log/munge/munged.log; do
        if [[ -s $log ]]; then
            echo "----- last lines of $log" >&2
            tail -n 20 "$log" >&2
        fi
    done
    exit 1
}

pid_alive() {  # pid_alive PIDFILE NAME: the pid in PIDFILE runs a process called NAME (a zombie does not count)
    local pid stat
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/stat ]] || return 1
    stat=$(</proc/"$pid"/stat) || return 1
    [[ $stat == "$pid ($2) "* && ${stat#*) } != Z* ]]
}

stop_pid() {  # stop_pid PIDFILE NAME: SIGTERM the daemon, SIGKILL it after 15 s
    local pid i
    pid_alive "$1" "$2" || return 0
    pid=$(<"$1")
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        pid_alive "$1" "$2" || return 0
        sleep 0.1
    done
    say "$2 (pid $pid) did not stop in 15 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

started() { [[ -f $STATE/started ]] && grep -qx "$1" "$STATE/started"; }
mark_started() { started "$1" || echo "$1" >>"$STATE/started"; }

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || missing+=(slurm-wlm)
    command -v munged >/dev/null || missing+=(munge)
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "${missing[*]} missing and no apt-get to install them"
    say "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q slurm-wlm munge >"$STATE/log/apt.log" 2>&1; then
        apt-get update -q >>"$STATE/log/apt.log" 2>&1 || true  # a fresh image may have no package lists
        apt-get install -y -q slurm-wlm munge >>"$STATE/log/apt.log" 2>&1 || { tail -n 20 "$STATE/log/apt.log" >&2; die "apt-get install slurm-wlm munge failed"; }
    fi
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    munge_works && return 0
    local key=/etc/munge/munge.key i
    if [[ ! -s $key ]]; then
        say "creating the munge key $key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile="$key"; else dd if=/dev/urandom of="$key" bs=1024 count=1 status=none; fi
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /etc/munge "$key" /run/munge /var/log/munge /var/lib/munge
    chmod 0700 /etc/munge
    chmod 0400 "$key"
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    mark_started munged
    for ((i = 0; i < 50; i++)); do
        munge_works && return 0
        sleep 0.1
    done
    die "munge does not answer (munge -n | unmunge)"
}

write_conf() {  # writes $CONF when it differs; returns 0 when it changed
    local cpus mem_kb mem_mb margin real defmem tmp layout hw
    cpus=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    mem_mb=$((mem_kb / 1024))
    margin=${REPOPT_SLURM_MEM_MARGIN_MB:-$((mem_mb / 10 > 512 ? mem_mb / 10 : 512))}
    real=$((mem_mb - margin))
    ((real > 0)) || die "RealMemory would be $real MB ($mem_mb MB total, margin $margin MB)"
    defmem=$((real / cpus))
    # the hardware's socket/core layout when the CPUs are all there (slurmd then agrees), else CPUs alone
    layout="CPUs=$cpus"
    hw=$(slurmd -C 2>/dev/null | head -n 1 || true)
    if [[ $hw =~ CPUs=([0-9]+)\ Boards=([0-9]+)\ SocketsPerBoard=([0-9]+)\ CoresPerSocket=([0-9]+)\ ThreadsPerCore=([0-9]+) ]] &&
        ((BASH_REMATCH[1] == cpus)); then
        layout="CPUs=$cpus Boards=${BASH_REMATCH[2]} SocketsPerBoard=${BASH_REMATCH[3]} CoresPerSocket=${BASH_REMATCH[4]} ThreadsPerCore=${BASH_REMATCH[5]}"
    fi
    tmp=$(mktemp "$STATE/slurm.conf.XXXXXX")
    cat >"$tmp" <<EOF
$MARKER for the tests (tests/test_slurm.py); it rewrites this file.
ClusterName=repopt
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
SwitchType=switch/none
# no cgroups: works in a container; job processes are found through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# cores and memory are the consumable resources: two 1-CPU jobs share the node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$defmem
# the node's own numbers, not its hardware's (a container's CPU and memory limits)
SlurmdParameters=config_overrides
JobRequeue=1
ReturnToService=2
# SIGTERM, then SIGKILL this much later: time to finish a step and write last.pt
KillWait=10
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE $layout RealMemory=$real State=UNKNOWN
PartitionName=main Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
        return 1
    fi
    mkdir -p "$(dirname "$CONF")"
    mv "$tmp" "$CONF"
    chmod 0644 "$CONF"
    say "wrote $CONF (node $NODE: $cpus CPUs, RealMemory $real MB, DefMemPerCPU $defmem MB)"
    return 0
}

node_state() { timeout 10 sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n 1; }

up() {
    [[ $(id -u) == 0 ]] || { say "ERROR: run as root (apt-get, daemons with SlurmUser=root)"; exit 1; }
    mkdir -p "$STATE/log" "$STATE/ctld" "$STATE/d"
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script: refusing to overwrite a site's SLURM config"
    fi
    install_packages
    start_munge
    local changed=1 state i
    write_conf || changed=0
    if ((changed)); then  # a new config: daemons of an older one start again with it
        stop_pid "$STATE/slurmd.pid" slurmd
        stop_pid "$STATE/slurmctld.pid" slurmctld
    fi
    if ! pid_alive "$STATE/slurmctld.pid" slurmctld; then
        slurmctld || die "slurmctld did not start"
        mark_started slurmctld
    fi
    if ! pid_alive "$STATE/slurmd.pid" slurmd; then
        slurmd || die "slurmd did not start"
        mark_started slurmd
    fi
    for ((i = 0; i < WAIT_S * 2; i++)); do
        state=$(node_state || true)
        case $state in
            idle | mix | alloc)
                say "up: node $NODE is $state (partition main; sinfo, sbatch, scontrol ready)"
                return 0
                ;;
            down | drain | drng)  # a state left from an earlier run of the daemons; ReturnToService=2 covers the rest
                if ((i % 10 == 0)); then scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true; fi
                ;;
        esac
        sleep 0.5
    done
    die "node $NODE is not usable after ${WAIT_S} s (sinfo state: '${state:-no answer}')"
}

down() {
    local i
    # only the jobs of the cluster this script runs: never a site's (its config has no marker)
    if pid_alive "$STATE/slurmctld.pid" slurmctld && [[ -f $CONF ]] && grep -qF "$MARKER" "$CONF"; then
        timeout 10 squeue -h -o %A | xargs -r scancel 2>/dev/null || true
        for ((i = 0; i < 60; i++)); do  # the jobs get SIGTERM, then SIGKILL after KillWait
            [[ -z $(timeout 10 squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_pid "$STATE/slurmd.pid" slurmd
    stop_pid "$STATE/slurmctld.pid" slurmctld
    if started munged; then
        stop_pid /run/munge/munged.pid munged
    fi
    rm -f "$STATE/started"
    rm -rf "${STATE:?}/ctld" "${STATE:?}/d"  # the next `up` starts from a clean cluster: no old jobs or node states
    say "down"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *)
        echo "usage: $0 up|down" >&2
        exit 2
        ;;
esac
