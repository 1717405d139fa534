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
# running PID: some thread of PID is not a zombie. A process that exited counts as gone at once,
# even before it is reaped (these are orphans, and some PID 1s reap them seconds later only).
running() {
  local t s
  for t in /proc/"$1"/task/*/stat; do
    s=$(sed 's/.*) //' "$t" 2> /dev/null | cut -c1)
    [ -n "$s" ] && [ "$s" != Z ] && return 0
  done
  return 1
}

stop_pid() { # $1 = pid file, $2 = expected program name
  local f=$1 comm=$2 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$pid" ] && running "$pid"; then
    if ! is_comm "$pid" "$comm"; then
      log "pid $pid of $(basename "$f") is no longer $comm; not signalling it"
    else
      kill -TERM "$pid" 2> /dev/null
      for _ in $(seq 1 50); do running "$pid" || break; sleep 0.1; done
      if running "$pid"; then kill -KILL "$pid" 2> /dev/null; sleep 0.2; fi
      log "stopped $(basename "$f" .pid) (pid $pid)"
    fi
  fi
  rm -f "$f"
}

# the watchdog (a setsid'd `bash watchdog.sh STATEDIR ...`, leader of its own process group)
stop_watchdog() {
  local f=$STATEDIR/watchdog.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ "$pid" = "$$" ] || [ "$pid" = "$PPID" ]; then
    rm -f "$f" # the watchdog is the caller: it exits by itself after this
    return 0
  fi
  if [ -n "$pid" ] && running "$pid" &&
    tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | grep -qF "watchdog.sh $STATEDIR "; then
    kill -TERM -- "-$pid" 2> /dev/null || kill -TERM "$pid" 2> /dev/null
    for _ in $(seq 1 20); do running "$pid" || break; sleep 0.1; done
    running "$pid" && kill -KILL -- "-$pid" 2> /dev/null
    log "stopped watchdog (pid $pid)"
  fi
  rm -f "$f"
}

stop_watchdog
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
