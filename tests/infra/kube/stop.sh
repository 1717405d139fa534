#!/bin/bash
# stop.sh - stop what start.sh started in STATEDIR, by its PID files only (never by name).
#
#   stop.sh STATEDIR [--purge]      --purge also deletes STATEDIR
#
# Order: the watchdog (unless it is the caller: it runs `stop.sh STATEDIR --purge` itself), then
# kube-scheduler, kube-controller-manager, kube-apiserver, etcd; each gets SIGTERM, then SIGKILL
# after 5 s. A PID whose process is not the expected program any more (/proc/PID/comm, PID reuse)
# is not signalled. Best effort: always exits 0 (a missing STATEDIR is fine).
# (--watchdog-only, used by start.sh, stops just the watchdog.)
set -uo pipefail # no -e: stop as much as possible
STATEDIR=${1:?usage: stop.sh STATEDIR [--purge]}
MODE=${2:-}
case $MODE in
  '' | --purge | --watchdog-only) ;;
  *) printf '[kube-stop] ERROR: unknown option %s (usage: stop.sh STATEDIR [--purge])\n' "$MODE" >&2; exit 2 ;;
esac
log() { printf '[kube-stop] %s\n' "$*" >&2; }
[ -d "$STATEDIR" ] || { log "no such dir: $STATEDIR"; exit 0; }
STATEDIR=$(cd "$STATEDIR" && pwd) # absolute, as start.sh wrote it into the watchdog's command

# is PID (still) COMM? comm is the executable's name cut to 15 characters
is_comm() { [ "$(cat "/proc/$1/comm" 2> /dev/null)" = "${2:0:15}" ]; }
# alive PID (proc-lib.sh): some thread of PID is not a zombie. A process that exited counts as
# gone at once, even before it is reaped (these are orphans, and some PID 1s reap them seconds
# later only). Also term_wait_kill and stop_watchdog, shared with the node tier's stop.sh.
# shellcheck source=tests/infra/proc-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../proc-lib.sh"

stop_pid() { # $1 = pid file, $2 = expected program name
  local f=$1 comm=$2 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && alive "$pid"; then
    if ! is_comm "$pid" "$comm"; then
      log "pid $pid of $(basename "$f") is no longer $comm; not signalling it"
    else
      term_wait_kill alive "$pid" 50
      log "stopped $(basename "$f" .pid) (pid $pid)"
    fi
  fi
  rm -f "$f"
}

stop_watchdog "$STATEDIR" alive
[ "$MODE" = --watchdog-only ] && exit 0
# reverse start order
stop_pid "$STATEDIR/kube-scheduler.pid" kube-scheduler
stop_pid "$STATEDIR/kube-controller-manager.pid" kube-controller-manager
stop_pid "$STATEDIR/kube-apiserver.pid" kube-apiserver
stop_pid "$STATEDIR/etcd.pid" etcd
if [ "$MODE" = --purge ]; then
  rm -rf "$STATEDIR"
  log "removed $STATEDIR"
fi
exit 0
