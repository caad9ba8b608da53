#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests/workflow/test_slurm.py (profiles/slurm-test).
#
#   .ci/slurm-up.sh          install (as root, with apt) and start munge, slurmctld and slurmd;
#                            wait until `sinfo` shows this host idle. Idempotent: a cluster that
#                            already answers is left as it is.
#   .ci/slurm-up.sh --stop   stop the daemons this script started (by the pids it recorded)
#
# The node is `hostname -s` at 127.0.0.1 with CPUs = nproc; no accounting (so Snakemake's SLURM
# executor must poll with `squeue`, hence MinJobAge=3600: finished jobs stay visible to squeue and
# `scontrol show job` for an hour). Recipe: Debian's slurm-wlm 22.05 + munge (bookworm).
# Exits non-zero with one clear line on stderr when it cannot.
set -euo pipefail

PIDS=${BLOCKEM_SLURM_PIDS:-/run/blockem-slurm.pids}  # "name pid" lines of what this script started
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)

die() { echo "slurm-up: $*" >&2; exit 1; }
log() { echo "slurm-up: $*" >&2; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
node_state() { timeout 10 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1 | tr -d ' *'; }

if [ "${1:-}" = "--stop" ]; then
    [ -f "$PIDS" ] || { log "nothing to stop ($PIDS not found)"; exit 0; }
    # slurmd, slurmctld, then munged: the reverse of the start order
    tac "$PIDS" | while read -r name pid; do
        if alive "$pid"; then
            kill "$pid" && log "stopped $name (pid $pid)"
            for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
        fi
    done
    rm -f "$PIDS"
    exit 0
fi

# already up: nothing to do (a drained node from an earlier run is resumed)
if command -v sinfo >/dev/null && [ -n "$(node_state)" ]; then
    case "$(node_state)" in
        idle|mix|alloc) log "already up: $(sinfo -h -n "$HOST" -o '%P %t %c CPUs' | head -n1)"; exit 0 ;;
        drain*|drng|down) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
fi

# --- install ------------------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || die "SLURM is not installed and this is not root: cannot install slurm-wlm and munge"
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install it"
    export DEBIAN_FRONTEND=noninteractive
    log "installing slurm-wlm and munge with apt-get (about a minute)"
    if ! apt-get install -y -qq slurm-wlm munge >/tmp/slurm-up-apt.log 2>&1; then
        apt-get update -qq >>/tmp/slurm-up-apt.log 2>&1 || true
        apt-get install -y -qq slurm-wlm munge >>/tmp/slurm-up-apt.log 2>&1 \
            || die "apt-get install slurm-wlm munge failed (see /tmp/slurm-up-apt.log)"
    fi
    # the packages may start their own services (systemd machines): this script runs its own
fi
[ "$(id -u)" = 0 ] || die "SLURM is installed but not running, and starting its daemons needs root"

record() { echo "$1 $2" >>"$PIDS"; }
pid_of() { [ -f "$1" ] && cat "$1" 2>/dev/null || true; }

# --- munge --------------------------------------------------------------------------------------
mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
[ -f /etc/munge/munge.key ] || mungekey -c >/dev/null 2>&1 \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge
chown munge /run/munge
chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    su -s /bin/sh munge -c /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null 2>&1 || die "munge does not answer (munge -n | unmunge)"
    record munged "$(pid_of /run/munge/munged.pid)"
fi

# --- slurm.conf for this host -------------------------------------------------------------------
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat >"$CONF.new" <<EOF
# written by blockem's .ci/slurm-up.sh: a one-node test cluster on $HOST
ClusterName=blockem
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$CONF.new" "$CONF" 2>/dev/null; then
    mv "$CONF.new" "$CONF"
    # a daemon of an earlier configuration would not read the new one
    for name in slurmd slurmctld; do
        pid=$(pid_of "/run/$name.pid")
        if alive "$pid"; then kill "$pid"; for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done; fi
    done
else
    rm -f "$CONF.new"
fi

# --- slurmctld, then slurmd (both daemonise) ----------------------------------------------------
for name in slurmctld slurmd; do
    pid=$(pid_of "/run/$name.pid")
    if ! alive "$pid"; then
        "/usr/sbin/$name" || die "$name did not start (see /var/log/slurm/$name.log)"
        for _ in $(seq 50); do alive "$(pid_of "/run/$name.pid")" && break; sleep 0.1; done
        pid=$(pid_of "/run/$name.pid")
        alive "$pid" || die "$name exited at start (see /var/log/slurm/$name.log)"
        record "$name" "$pid"
    fi
done

# --- wait for the node ----------------------------------------------------------------------------
for _ in $(seq 60); do
    state=$(node_state)
    case "$state" in
        idle) log "up: $(sinfo -h -n "$HOST" -o 'partition %P, node %N %t, %c CPUs, %m MB'); pids in $PIDS"
              exit 0 ;;
        drain*|drng|down) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
die "node $HOST is not idle after 60 s (state '${state:-no answer}'; see /var/log/slurm/slurmctld.log and slurmd.log)"
