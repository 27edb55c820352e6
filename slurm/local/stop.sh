#!/usr/bin/env bash
# slurm/local/stop.sh - stop the cluster started by slurm/local/start.sh.
#
# usage: stop.sh [--wipe] [--quiet]
#   --wipe    also delete $HICMAE_SLURM_DIR (controller state, spool, logs, MariaDB datadir)
#   --quiet   print only what had to be killed
#
# Stops, each by the PID it recorded (never by name): the jobs (scancel, so no job process
# outlives slurmd), slurmctld and slurmd (`scontrol shutdown` saves state first), step
# daemons left behind with their process trees, slurmdbd, mariadbd and munged.
# Safe to run when nothing is running; always exits 0.
set -uo pipefail
DIR="${HICMAE_SLURM_DIR:-${TMPDIR:-/tmp}/hicmae-slurm}"
WIPE=0; QUIET=0; LOCK=1
for a in "$@"; do case "$a" in
  --wipe) WIPE=1;; --quiet) QUIET=1;;
  --no-lock) LOCK=0;;        # internal: start.sh already holds the lock
  *) echo "usage: $0 [--wipe] [--quiet]" >&2; exit 2;; esac; done
say()  { [ "$QUIET" = 1 ] || echo "[slurm-local stop] $*"; }
warn() { echo "[slurm-local stop] $*"; }

if [ "$LOCK" = 1 ] && [ -d "$DIR" ]; then
  exec 9>"$DIR.lock"
  flock -w 300 9 || warn "could not take $DIR.lock within 300 s; stopping anyway"
fi

# alive PID: exists and is not a zombie (PID 1 of a container may reap late or never)
alive()  { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$s" ] && [ "${s:0:1}" != Z ]; }
pid_of() { [ -s "$1" ] && head -n1 "$1" 2>/dev/null | tr -dc 0-9; }
# stop_pid NAME PID: SIGTERM, wait up to 15 s, then SIGKILL; ignores a stale pid file
stop_pid() {
  local name=$1 pid=${2:-} i
  [ -n "$pid" ] && alive "$pid" || return 0
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ] || { say "pid $pid is not $name (stale pid file)"; return 0; }
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 1 75); do alive "$pid" || { say "$name ($pid) stopped"; return 0; }; sleep 0.2; done
  warn "$name ($pid) ignored SIGTERM for 15 s: SIGKILL"; kill -KILL "$pid" 2>/dev/null; sleep 0.3
}
# kill_tree PID: SIGKILL PID and all its descendants
kill_tree() {
  local p=$1 c
  for c in $(ps -o pid= --ppid "$p" 2>/dev/null); do kill_tree "$c"; done
  kill -KILL "$p" 2>/dev/null
}

CTLD_PID=$(pid_of "$DIR/run/slurmctld.pid")
SLURMD_PIDS=$(for f in "$DIR"/run/slurmd*.pid; do [ -e "$f" ] && pid_of "$f"; done)

if [ -n "$CTLD_PID" ] && alive "$CTLD_PID" && timeout 10 scontrol ping >/dev/null 2>&1; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    say "cancelling jobs: $(echo $jobs)"
    scancel $jobs 2>/dev/null
    # SIGTERM, then SIGKILL KillWait s later; give it that long plus a margin
    kw=$(scontrol show config 2>/dev/null | awk '$1=="KillWait" {print $3+0}')
    for i in $(seq 1 $(( (${kw:-30} + 15) * 5 ))); do
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2
    done
  fi
  timeout 20 scontrol shutdown >/dev/null 2>&1 && say "scontrol shutdown sent"
fi
stop_pid slurmctld "$CTLD_PID"
for p in $SLURMD_PIDS; do stop_pid slurmd "$p"; done

# step daemons that survived (a job stuck in COMPLETING, or slurmd killed with -9), with the
# job processes under them
for p in $(ps -eo pid=,stat=,comm= | awk '$3=="slurmstepd" && $2 !~ /^Z/ {print $1}'); do
  warn "killing leftover $(ps -o args= -p "$p" 2>/dev/null) (pid $p) and its processes"
  kill_tree "$p"
done

stop_pid slurmdbd "$(pid_of "$DIR/run/slurmdbd.pid")"
stop_pid mariadbd "$(pid_of "$DIR/mysql/mysqld.pid")"
stop_pid munged "$(pid_of /run/munge/munged.pid)"
rm -f "$DIR/fingerprint"

if [ "$WIPE" = 1 ]; then rm -rf "$DIR"; say "wiped $DIR"; fi
exit 0
