#!/usr/bin/env bash
# slurm/local/start.sh - start a REAL single-node Slurm on this machine, for hicmae-dist's
# Slurm tests and for trying `hicmae-dist submit --cluster local` by hand.
#
#   munged + mariadbd (private datadir, loopback only) + slurmdbd + slurmctld + slurmd,
#   all as root, no systemd, no cgroups; state, spool, logs and pid files under $HICMAE_SLURM_DIR;
#   config in /etc/slurm (the default path, so every client command finds it).
#
# Partitions: `debug` (default, preemptable) and `urgent` (higher PriorityTier): a job in
# `urgent` preempts (requeues) `debug` jobs, which first get their --signal (USR2 from
# submitit) and GraceTime seconds to checkpoint.
#
# Idempotent: installs the Debian packages it needs when they are missing; when a cluster
# started by this script with the same settings is already up and healthy it does nothing
# (prints "already up"); otherwise it stops the old one (stop.sh) and starts afresh, wiping
# the old state unless HICMAE_SLURM_KEEP_STATE=1. Concurrent calls are serialised (flock).
# Exit 0 = node idle, a batch job ran through srun, and sacct saw it COMPLETED; 3 = the
# packages are missing and cannot be installed; 1 = anything else went wrong (log tails shown).
#
# usage: start.sh [--restart] [--fake-gpus N] [--nodes N] [--no-dbd]
#   --restart      restart even when a healthy cluster with these settings is up
# Environment (flags win):
#   HICMAE_SLURM_DIR=${TMPDIR:-/tmp}/hicmae-slurm   state, spool, logs, pids, MariaDB datadir
#   HICMAE_SLURM_DBD=1              0: no MariaDB/slurmdbd (faster start, but sacct fails and
#                                   submitit never sees a killed job as finished)
#   HICMAE_SLURM_KEEP_STATE=0       1: keep controller and accounting state across restarts
#   HICMAE_SLURM_NODES=1            >1: emulate N nodes here (node1..nodeN, one slurmd each)
#   HICMAE_SLURM_FAKE_GPUS=0        N>0: each node advertises N fake "gpu" GRES
#   HICMAE_SLURM_CRED_EXPIRE=10     s; also how long a requeued job waits before it restarts
#   HICMAE_SLURM_GRACE_TIME=30      s from a preempted job's USR2 to its SIGTERM
#   HICMAE_SLURM_KILL_WAIT=15       s from SIGTERM (scancel, time limit) to SIGKILL
#   HICMAE_SLURM_DB_PORT=3307       MariaDB port (127.0.0.1 only)
#   HICMAE_SLURM_NO_INSTALL=0       1: never call apt-get (fail when packages are missing)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${HICMAE_SLURM_DIR:-${TMPDIR:-/tmp}/hicmae-slurm}"
WITH_DBD="${HICMAE_SLURM_DBD:-1}"
KEEP_STATE="${HICMAE_SLURM_KEEP_STATE:-0}"
NNODES="${HICMAE_SLURM_NODES:-1}"
FAKE_GPUS="${HICMAE_SLURM_FAKE_GPUS:-0}"
CRED_EXPIRE="${HICMAE_SLURM_CRED_EXPIRE:-10}"
GRACE="${HICMAE_SLURM_GRACE_TIME:-30}"
KILL_WAIT="${HICMAE_SLURM_KILL_WAIT:-15}"
DB_PORT="${HICMAE_SLURM_DB_PORT:-3307}"
NO_INSTALL="${HICMAE_SLURM_NO_INSTALL:-0}"
RESTART=0
while [ $# -gt 0 ]; do
  case "$1" in
    --restart) RESTART=1;;
    --fake-gpus) FAKE_GPUS="$2"; shift;;
    --nodes) NNODES="$2"; shift;;
    --no-dbd) WITH_DBD=0;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
    *) echo "start.sh: unknown argument $1 (see --help)" >&2; exit 2;;
  esac; shift
done
PARTITION=debug
URGENT=urgent
CLUSTER=hicmae-local
CONF_DIR=/etc/slurm
T0=$(date +%s%N)

log() { printf '[slurm-local %6.2fs] %s\n' "$(awk -v a="$T0" -v b="$(date +%s%N)" 'BEGIN{print (b-a)/1e9}')" "$*"; }
# exit 3: the packages are missing and cannot be installed (the tests skip on that, or fail in CI)
die_pkg() { log "ERROR: $*"; exit 3; }
die() { log "ERROR: $*"
        for f in "$DIR"/log/*.log "$DIR"/mysql/error.log; do
          [ -f "$f" ] && { echo "----- tail $f"; tail -n 25 "$f"; }; done
        exit 1; }
# wait_for SECONDS CMD...: run CMD every 0.2 s until it succeeds or SECONDS pass
wait_for() { local end=$(( $(date +%s) + $1 )); shift
             until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -ge "$end" ] && return 1; sleep 0.2; done; }
for v in NNODES FAKE_GPUS CRED_EXPIRE GRACE KILL_WAIT DB_PORT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "start.sh: $v must be a number, got '${!v}'" >&2; exit 2; }
done
[ "$NNODES" -ge 1 ] || { echo "start.sh: --nodes must be >= 1" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "start.sh must run as root (it starts the daemons and writes /etc/slurm)" >&2; exit 1; }

mkdir -p "$DIR"
# One start/stop at a time (two test sessions, a human and a test). The daemons are started
# with `9>&-`: one that inherited the lock's descriptor would hold the lock for its lifetime.
exec 9>"$DIR.lock"
flock -w 600 9 || die "another start.sh/stop.sh holds $DIR.lock"

# ------------------------------------------------------------------ already up?
# The settings that shape slurm.conf; a running cluster with the same fingerprint is reused.
FINGERPRINT="dir=$DIR dbd=$WITH_DBD nodes=$NNODES gpus=$FAKE_GPUS cred=$CRED_EXPIRE grace=$GRACE killwait=$KILL_WAIT db=$DB_PORT host=$(hostname -s)"
healthy() {
  [ "$(cat "$DIR/fingerprint" 2>/dev/null)" = "$FINGERPRINT" ] || return 1
  timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
  # every node usable (idle, mixed or allocated; not down/drained)
  local bad; bad=$(sinfo -h -N -o '%T' 2>/dev/null | grep -cvE '^(idle|mixed|allocated|completing)$' || true)
  [ "$bad" = 0 ] && [ "$(sinfo -h -N -o '%N' | sort -u | wc -l)" = "$NNODES" ] || return 1
  [ "$WITH_DBD" = 0 ] || timeout 10 sacct -n -X -S now-1minutes >/dev/null 2>&1
}
if [ "$RESTART" = 0 ] && command -v scontrol >/dev/null && healthy; then
  log "already up: $(sinfo -h -o '%P %a %D %T' | paste -sd';') (state in $DIR; --restart to restart)"
  exit 0
fi

# ------------------------------------------------------------------ packages
pkgs=()
for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || pkgs+=(slurmctld slurmd slurm-client munge); done
if [ "$WITH_DBD" = 1 ]; then
  for b in slurmdbd mariadbd mariadb-install-db; do command -v "$b" >/dev/null || pkgs+=(slurmdbd mariadb-server); done
fi
if [ ${#pkgs[@]} -gt 0 ]; then
  [ "$NO_INSTALL" = 1 ] && die_pkg "missing packages: $(printf '%s\n' "${pkgs[@]}" | sort -u | xargs) (HICMAE_SLURM_NO_INSTALL=1)"
  command -v apt-get >/dev/null || die_pkg "missing packages and no apt-get: install Slurm 22.05+ (slurmctld slurmd slurmdbd munge) and MariaDB"
  pkgs=($(printf '%s\n' "${pkgs[@]}" | sort -u))
  log "installing ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep the packages' postinst from starting services (mariadb would start on :3306).
  TMP_POLICY=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; TMP_POLICY=1
  fi
  trap '[ "$TMP_POLICY" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
  # `apt-get update` only when the package lists are missing or the install fails on them
  if ! apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >"$DIR/apt.log" 2>&1; then
    apt-get update -qq >>"$DIR/apt.log" 2>&1 || true
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >>"$DIR/apt.log" 2>&1 \
      || { tail -n 20 "$DIR/apt.log"; die_pkg "apt-get install ${pkgs[*]} failed"; }
  fi
  [ "$TMP_POLICY" = 1 ] && rm -f /usr/sbin/policy-rc.d; trap - EXIT
fi
log "packages ok: $(slurmctld -V)"

# ------------------------------------------------------------------ clean slate
HICMAE_SLURM_DIR="$DIR" "$HERE/stop.sh" --quiet --no-lock || true
if [ "$KEEP_STATE" != 1 ]; then
  rm -rf "$DIR"/{state,spool,log,run,mysql,fakegpu,fingerprint}
fi
mkdir -p "$DIR"/{state,spool,log,run,mysql}

# ------------------------------------------------------------------ node names
HOST="$(hostname -s)"
[ -n "$HOST" ] || die "empty hostname"
if [ "$NNODES" -gt 1 ]; then
  NODES="node[1-$NNODES]"; NODE_NAMES=$(seq -f 'node%g' 1 "$NNODES")
else
  NODES="$HOST"; NODE_NAMES="$HOST"
fi
# The first name in SLURM_JOB_NODELIST becomes MASTER_ADDR (submitit's
# TorchDistributedEnvironment), so node names must resolve or the gloo rendezvous hangs.
for n in $HOST $NODE_NAMES; do
  if ! getent hosts "$n" >/dev/null; then
    log "'$n' does not resolve; appending '127.0.0.1 $n' to /etc/hosts"
    echo "127.0.0.1 $n" >> /etc/hosts
  fi
done

# ------------------------------------------------------------------ munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key --force
chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge      # what systemd's RuntimeDirectory would make
install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged 9>&-
  wait_for 10 bash -c 'munge -n | unmunge' || die "munged did not come up"
fi
log "munge ok (pid $(cat /run/munge/munged.pid 2>/dev/null))"

# ------------------------------------------------------------------ slurm.conf
# Topology from `slurmd -C`; RealMemory = 90% of RAM / nodes (more than the machine has
# drains the node with "Low RealMemory").
HW="$(slurmd -C)"; HW="${HW%%$'\n'*}"
CPUS=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$HW")
TOPO=$(grep -o 'Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$HW" || true)
MEM_MB=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 / NNODES ))
[ -n "$CPUS" ] || die "cannot parse 'slurmd -C': $HW"
# Job ids derived from the clock: after a wipe, ids do not restart at 1, so a reused
# submitit folder (…/%j) never hands back the result of an older job with the same id.
FIRST_JOB_ID=$(( $(date +%s%N) / 1000000 % 60000000 + 1 ))

GRES_TYPES=""; GRES_NODE=""
rm -f "$CONF_DIR/gres.conf"
if [ "$FAKE_GPUS" -gt 0 ]; then
  GRES_TYPES="GresTypes=gpu"; GRES_NODE="Gres=gpu:$FAKE_GPUS"
  # gres.conf needs device files: a count-only line makes slurmd report 0 GPUs and the node
  # goes INVALID+DRAIN. Character devices aliasing /dev/null stand in for /dev/nvidiaN (with
  # them Slurm also sets CUDA_VISIBLE_DEVICES).
  mkdir -p "$DIR/fakegpu"
  for i in $(seq 0 $((FAKE_GPUS - 1))); do
    rm -f "$DIR/fakegpu/nvidia$i"
    mknod "$DIR/fakegpu/nvidia$i" c 1 3 2>/dev/null || touch "$DIR/fakegpu/nvidia$i"
  done
  printf 'AutoDetect=off\nNodeName=%s Name=gpu File=%s/fakegpu/nvidia[0-%d]\n' \
    "$NODES" "$DIR" $((FAKE_GPUS - 1)) > "$CONF_DIR/gres.conf"
fi

if [ "$NNODES" -gt 1 ]; then   # several slurmd on one host: a port, spool, pid and log each
  NODE_LINE="NodeName=$NODES NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[6831-$((6830 + NNODES))]"
  SPOOL="$DIR/spool/%n"; SLURMD_PID="$DIR/run/slurmd-%n.pid"; SLURMD_LOG="$DIR/log/slurmd-%n.log"
else
  NODE_LINE="NodeName=$HOST NodeAddr=127.0.0.1"
  SPOOL="$DIR/spool"; SLURMD_PID="$DIR/run/slurmd.pid"; SLURMD_LOG="$DIR/log/slurmd.log"
fi
if [ "$WITH_DBD" = 1 ]; then
  ACCT=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nAccountingStoragePort=6819'
else
  ACCT="AccountingStorageType=accounting_storage/none"
fi

mkdir -p "$CONF_DIR"
cat > "$CONF_DIR/slurm.conf" <<EOF
# generated by hicmae-dist slurm/local/start.sh ($FINGERPRINT)
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again only cred_expire s after it ended (default 120)
AuthInfo=cred_expire=$CRED_EXPIRE
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$SLURMD_LOG
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
FirstJobId=$FIRST_JOB_ID
# no cgroups: nothing here needs a writable, delegated cgroup tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
$ACCT
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default a job with no --mem takes the node's whole memory
DefMemPerCPU=1024
SchedulerType=sched/backfill
# backfill every second: a requeued job restarts as soon as cred_expire has passed
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
MinJobAge=300
KillWait=$KILL_WAIT
Waittime=0
# Preemption: a job in $URGENT requeues the jobs of $PARTITION it needs room from. With
# preempt_send_user_signal they first get their --signal (submitit: USR2), then GraceTime
# seconds, then SIGTERM and KillWait seconds later SIGKILL.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=1
$GRES_TYPES
$NODE_LINE CPUs=$CPUS $TOPO RealMemory=$MEM_MB $GRES_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=1 GraceTime=$GRACE
PartitionName=$URGENT Nodes=ALL Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO PriorityTier=10 PreemptMode=OFF
EOF

# ------------------------------------------------------------------ mariadb + slurmdbd
if [ "$WITH_DBD" = 1 ]; then
  M="$DIR/mysql"
  if (exec 3<>"/dev/tcp/127.0.0.1/$DB_PORT") 2>/dev/null; then
    die "port $DB_PORT is taken by another process; set HICMAE_SLURM_DB_PORT"
  fi
  if [ ! -d "$M/data/mysql" ]; then
    mariadb-install-db --no-defaults --user=root --datadir="$M/data" \
      --auth-root-authentication-method=normal --skip-test-db >"$M/install.log" 2>&1 \
      || { cat "$M/install.log"; die "mariadb-install-db failed"; }
  fi
  # setsid: the server must not die with this shell's session (pytest's subprocess)
  setsid mariadbd --no-defaults --user=root --datadir="$M/data" --socket="$M/mysqld.sock" \
    --pid-file="$M/mysqld.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
    --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 \
    --innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --skip-log-bin \
    --log-error="$M/error.log" </dev/null >/dev/null 2>&1 9>&- &
  wait_for 60 mariadb-admin --no-defaults --socket="$M/mysqld.sock" -uroot ping \
    || die "mariadbd did not come up"
  mariadb --no-defaults --socket="$M/mysqld.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'hicmae-local';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
  log "mariadb ok (127.0.0.1:$DB_PORT, pid $(cat "$M/mysqld.pid"))"

  cat > "$CONF_DIR/slurmdbd.conf" <<EOF
# generated by hicmae-dist slurm/local/start.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=hicmae-local
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$CONF_DIR/slurmdbd.conf"        # slurmdbd refuses a group/world-readable file
  slurmdbd 9>&-                              # daemonizes
  wait_for 60 sacctmgr -n list cluster || die "slurmdbd did not come up"
  sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  log "slurmdbd ok (pid $(cat "$DIR/run/slurmdbd.pid"))"
else
  rm -f "$CONF_DIR/slurmdbd.conf"
fi

# ------------------------------------------------------------------ slurmctld + slurmd
slurmctld 9>&- || die "slurmctld failed to start"     # daemonizes
wait_for 30 scontrol ping || die "slurmctld not answering"
if [ "$NNODES" -gt 1 ]; then
  for n in $NODE_NAMES; do slurmd -N "$n" 9>&- || die "slurmd -N $n failed to start"; done
else
  slurmd 9>&- || die "slurmd failed to start"
fi
nodes_idle() { [ "$(sinfo -h -N -p "$PARTITION" -o '%T' | grep -cx idle)" = "$NNODES" ]; }
if ! wait_for 30 nodes_idle; then
  scontrol update nodename="$NODES" state=resume 2>/dev/null || true   # DOWN/DRAIN from kept state
  wait_for 30 nodes_idle || { sinfo -R; scontrol show node; die "nodes $NODES not idle"; }
fi
log "slurmctld + slurmd ok: $(sinfo -h -o '%P %a %D %T %N' | paste -sd';')"

# ------------------------------------------------------------------ smoke test
# One batch job that runs a step on every node covers sbatch, srun and the job credential;
# sacct then shows that accounting reaches slurmdbd (the first record can take a few s).
SMOKE=$(timeout 60 sbatch --parsable --wait -N "$NNODES" -n "$NNODES" -t 1 -J hicmae-local-smoke \
        -o "$DIR/log/smoke-%j.out" --wrap 'srun true') || die "smoke-test sbatch failed"
if [ "$WITH_DBD" = 1 ]; then
  wait_for 30 bash -c "sacct -n -X -j $SMOKE -o state | grep -q COMPLETED" \
    || die "sacct does not show smoke-test job $SMOKE as COMPLETED"
fi
echo "$FINGERPRINT" > "$DIR/fingerprint"
log "cluster '$CLUSTER' ready: nodes $NODES CPUs=$CPUS RealMemory=${MEM_MB}MB fake_gpus=$FAKE_GPUS" \
    "partitions $PARTITION(default, preemptable) $URGENT(preempts) dbd=$WITH_DBD first_job_id=$FIRST_JOB_ID"
