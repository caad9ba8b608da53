#!/usr/bin/env bash
# A real single-node SLURM with job accounting on this machine, for tests/workflow/test_slurm.py
# (profiles/slurm, whose status command is `sacct`, and profiles/slurm-test, `squeue`).
#
#   .ci/slurm-up.sh          install (as root, with apt) and start munge, MariaDB, slurmdbd,
#                            slurmctld and slurmd; register the cluster `blockem` and the account
#                            `blockem` (user root, its default account) in the accounting
#                            database; wait until `sinfo` shows this host idle and `sacct`
#                            answers. Idempotent: what already runs is kept, what is missing is
#                            started; a cluster that already answers is left as it is.
#   .ci/slurm-up.sh --stop   stop every daemon this script started (by the pids it recorded):
#                            slurmd, slurmctld, slurmdbd, MariaDB, munged
#
# The node is `hostname -s` at 127.0.0.1 with CPUs = nproc, partition `debug`. Accounting:
# AccountingStorageType=accounting_storage/slurmdbd -> slurmdbd (StorageType=
# accounting_storage/mysql) -> a local MariaDB (database slurm_acct_db, user slurm); jobs must
# have a valid association (AccountingStorageEnforce=associations). MinJobAge=3600 keeps finished
# jobs visible to `squeue` for an hour (profiles/slurm-test). Recipe: Debian bookworm's slurm-wlm
# and slurmdbd 22.05, munge, mariadb-server 10.11.
# Exits non-zero with one clear line on stderr ("slurm-up: ERROR: ...") when it cannot.
set -euo pipefail

PIDS=${BLOCKEM_SLURM_PIDS:-/run/blockem-slurm.pids}  # "name pid" lines of what this script started
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
CLUSTER=blockem
ACCOUNT=blockem
HOST=$(hostname -s)
LOG=/var/log/slurm
APT_LOG=/tmp/slurm-up-apt.log
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

die() { echo "slurm-up: ERROR: $*" >&2; exit 1; }
log() { echo "slurm-up: $*" >&2; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -f "$1" ] && cat "$1" 2>/dev/null || true; }
record() {  # name pid (replacing an earlier line of that name: its pid may be reused by now)
    [ -f "$PIDS" ] && sed -i "/^$1 /d" "$PIDS"
    echo "$1 $2" >>"$PIDS"
}
node_state() { timeout 10 sinfo -h -n "$HOST" -o %t 2>/dev/null | head -n1 | tr -d ' *'; }
# the accounting database answers and knows this cluster
accounting_ok() {
    timeout 10 sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER" \
        && timeout 10 sacct -n -X -S now >/dev/null 2>&1
}
stop_pid() {  # name pid: TERM, then wait up to 30 s (MariaDB flushes on shutdown)
    alive "$2" || return 0
    kill "$2" 2>/dev/null || true
    for _ in $(seq 300); do alive "$2" || break; sleep 0.1; done
    if alive "$2"; then kill -9 "$2" 2>/dev/null || true; log "killed $1 (pid $2; no exit after 30 s)"
    else log "stopped $1 (pid $2)"; fi
}

if [ "${1:-}" = "--stop" ]; then
    [ -f "$PIDS" ] || { log "nothing to stop ($PIDS not found)"; exit 0; }
    # the reverse of the start order (whatever was restarted when)
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        stop_pid "$name" "$(awk -v n="$name" '$1 == n {print $2}' "$PIDS" | tail -n1)"
    done
    rm -f "$PIDS"
    exit 0
fi
[ $# -eq 0 ] || die "unknown argument '$1' (usage: .ci/slurm-up.sh [--stop])"

# already up, with accounting: nothing to do (a drained node from an earlier run is resumed)
if command -v sinfo >/dev/null && command -v sacctmgr >/dev/null && [ -n "$(node_state)" ] \
        && accounting_ok; then
    case "$(node_state)" in
        idle|mix|alloc) log "already up: $(sinfo -h -n "$HOST" -o '%P %t %c CPUs' | head -n1), accounting in slurmdbd"
                        exit 0 ;;
        drain*|drng|down) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
fi

# --- install ------------------------------------------------------------------------------------
missing=0
for bin in slurmctld slurmd slurmdbd munged mariadbd sacct sacctmgr; do
    command -v "$bin" >/dev/null || [ -x "/usr/sbin/$bin" ] || missing=1
done
if [ "$missing" = 1 ]; then
    [ "$(id -u)" = 0 ] || die "SLURM/slurmdbd/MariaDB are not installed and this is not root: cannot install ${PACKAGES[*]}"
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install ${PACKAGES[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # the packages must not start their own services (this script starts and records its own):
    # a policy-rc.d that denies every start, only for the install, unless one is there already
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    fi
    log "installing ${PACKAGES[*]} with apt-get (a minute or two; log: $APT_LOG)"
    ok=0
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"$APT_LOG" 2>&1 && ok=1
    if [ "$ok" = 0 ]; then  # stale package lists: update once, then try again
        apt-get update -qq >>"$APT_LOG" 2>&1 || true
        apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$APT_LOG" 2>&1 && ok=1
    fi
    [ -z "$policy" ] || rm -f "$policy"
    [ "$ok" = 1 ] || die "apt-get install ${PACKAGES[*]} failed (see $APT_LOG)"
fi
[ "$(id -u)" = 0 ] || die "SLURM is installed but not running with accounting, and starting its daemons needs root"
mkdir -p "$(dirname "$PIDS")" "$LOG" /etc/slurm /var/spool/slurmctld /var/spool/slurmd

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
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || die "munge does not answer (munge -n | unmunge)"
    record munged "$(pid_of /run/munge/munged.pid)"
fi

# --- MariaDB: the accounting database -------------------------------------------------------------
mkdir -p /run/mysqld /var/log/mysql
chown mysql:mysql /run/mysqld /var/log/mysql
if ! mariadb-admin --connect-timeout=2 ping >/dev/null 2>&1; then
    # the package creates the data directory; an interrupted install may not have
    [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql \
        >>"$LOG/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
    setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
        --socket=/run/mysqld/mysqld.sock --bind-address=127.0.0.1 --innodb-buffer-pool-size=64M \
        --log-error="$LOG/mariadb.log" </dev/null >/dev/null 2>&1 &
    for _ in $(seq 300); do mariadb-admin --connect-timeout=2 ping >/dev/null 2>&1 && break; sleep 0.1; done
    mariadb-admin --connect-timeout=2 ping >/dev/null 2>&1 || die "MariaDB did not start in 30 s (see $LOG/mariadb.log)"
    record mariadbd "$(pid_of /run/mysqld/mysqld.pid)"
fi
# database and user for slurmdbd (root reaches MariaDB through its unix socket); the password is
# kept in slurmdbd.conf (mode 600) across runs
pass=$(sed -n 's/^StoragePass=//p' "$DBD_CONF" 2>/dev/null || true)
[ -n "$pass" ] || pass=$(head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9')
mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pass';
            ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pass';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" \
    2>>"$LOG/mariadb.log" || die "could not create the slurm_acct_db database and its user in MariaDB (see $LOG/mariadb.log)"

# --- configuration ------------------------------------------------------------------------------
restart=()  # daemons to restart: their configuration changed
write_conf() {  # path daemons...: install $1.new as $1 when it differs
    local path=$1; shift
    if cmp -s "$path.new" "$path" 2>/dev/null; then rm -f "$path.new"
    else mv "$path.new" "$path"; restart+=("$@"); fi
}
cat >"$DBD_CONF.new" <<EOF
# written by blockem's .ci/slurm-up.sh: accounting for the one-node test cluster on $HOST
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
AuthType=auth/munge
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$pass
StorageLoc=slurm_acct_db
PidFile=/run/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
EOF
chmod 600 "$DBD_CONF.new"
write_conf "$DBD_CONF" slurmdbd

CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.85)}' /proc/meminfo)
cat >"$CONF.new" <<EOF
# written by blockem's .ci/slurm-up.sh: a one-node test cluster on $HOST, with accounting
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MinJobAge=3600
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
write_conf "$CONF" slurmd slurmctld
# a daemon of an earlier configuration would not read the new one
for name in "${restart[@]}"; do
    pid=$(pid_of "/run/$name.pid")
    if alive "$pid"; then log "restarting $name (new configuration)"; stop_pid "$name" "$pid"; fi
done

start_daemon() {  # name: start /usr/sbin/<name> (it daemonises) unless its pid file's process lives
    local name=$1 pid
    pid=$(pid_of "/run/$name.pid")
    alive "$pid" && return 0
    "/usr/sbin/$name" || die "$name did not start (see $LOG/$name.log)"
    for _ in $(seq 100); do alive "$(pid_of "/run/$name.pid")" && break; sleep 0.1; done
    pid=$(pid_of "/run/$name.pid")
    alive "$pid" || die "$name exited at start (see $LOG/$name.log)"
    record "$name" "$pid"
}

# --- slurmdbd, then the cluster and account in it -------------------------------------------------
start_daemon slurmdbd
# the first start creates the tables (seconds to a minute on a busy machine)
for _ in $(seq 120); do timeout 10 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 1; done
timeout 10 sacctmgr -n list cluster >/dev/null 2>&1 \
    || die "slurmdbd does not answer sacctmgr after 120 s (see $LOG/slurmdbd.log and $LOG/mariadb.log)"
add() {  # what: sacctmgr -i add <what...> unless it exists (sacctmgr says "Nothing new added")
    out=$(timeout 20 sacctmgr -i add "$@" 2>&1) || case "$out" in
        *"Nothing new added"*|*"already exists"*) ;;
        *) die "sacctmgr add $* failed: $(echo "$out" | tr '\n' ' ')" ;;
    esac
}
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || add cluster "$CLUSTER"
sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT" \
    || add account "$ACCOUNT" cluster="$CLUSTER" description="blockem CI" organization=blockem
sacctmgr -n -P list user root format=defaultaccount | grep -qx "$ACCOUNT" \
    || add user root account="$ACCOUNT" defaultaccount="$ACCOUNT" cluster="$CLUSTER"
sacctmgr -n -P list association cluster="$CLUSTER" user=root format=account | grep -qx "$ACCOUNT" \
    || add user root account="$ACCOUNT" cluster="$CLUSTER"

# --- slurmctld, then slurmd -----------------------------------------------------------------------
start_daemon slurmctld
start_daemon slurmd

# --- wait for the node and for accounting -------------------------------------------------------------
state=""
for _ in $(seq 90); do
    state=$(node_state)
    case "$state" in
        idle) if accounting_ok; then
                  log "up: $(sinfo -h -n "$HOST" -o 'partition %P, node %N %t, %c CPUs, %m MB'); accounting: cluster $CLUSTER, account $ACCOUNT in slurmdbd; pids in $PIDS"
                  exit 0
              fi ;;
        drain*|drng|down) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
accounting_ok || die "sacct/sacctmgr do not answer for cluster $CLUSTER after 90 s (see $LOG/slurmctld.log and slurmdbd.log)"
die "node $HOST is not idle after 90 s (state '${state:-no answer}'; see $LOG/slurmctld.log and slurmd.log)"
