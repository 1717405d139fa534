#!/bin/bash
# watchdog.sh - started by start.sh (detached: setsid nohup, PID in STATEDIR/watchdog.pid) when
# KUBE_OWNER_PID is set, and by ../node/start.sh when KNODE_OWNER_PID is set; not meant to be
# run by hand.
#
#   watchdog.sh STATEDIR OWNER_PID OWNER_START STARTER_PID STARTER_START [STOP_SCRIPT]
#
# STOP_SCRIPT: the stop.sh to run (default: this directory's; the node passes its own).
# Every second: is OWNER_PID still alive and still the same process (its /proc/PID/stat start
# time = OWNER_START, so a reused PID does not count)? Once it is gone, wait for start.sh
# (STARTER_PID, same check) to finish, so nothing is started after the clean-up, then run
# `STOP_SCRIPT STATEDIR --purge` and exit. Exits quietly when STATEDIR disappears (stop.sh
# --purge ran) and is stopped by stop.sh otherwise.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATEDIR=${1:?} OWNER_PID=${2:?} OWNER_START=${3:?} STARTER_PID=${4:?} STARTER_START=${5:?}
STOP=${6:-$HERE/stop.sh}
TAG=$(basename "$(dirname "$STOP")")-watchdog # kube-watchdog, node-watchdog
log() { printf '[%s %s] %s\n' "$TAG" "$(date +%H:%M:%S)" "$*" >&2; }

starttime() { { sed 's/.*) //' "/proc/$1/stat" 2> /dev/null || true; } | cut -d' ' -f20; }
# same PID PID_START: PID runs, started at PID_START, and is not all zombie (an exited but not
# yet reaped process is gone for us; a multi-threaded one is alive while any thread is not Z)
same() {
  local t s
  [ "$(starttime "$1")" = "$2" ] || return 1
  for t in /proc/"$1"/task/*/stat; do
    s=$(sed 's/.*) //' "$t" 2> /dev/null | cut -c1)
    [ -n "$s" ] && [ "$s" != Z ] && return 0
  done
  return 1
}

log "watching pid $OWNER_PID (start time $OWNER_START) for $STATEDIR"
while same "$OWNER_PID" "$OWNER_START"; do
  [ -d "$STATEDIR" ] || exit 0
  sleep 1
done
log "pid $OWNER_PID is gone"
while same "$STARTER_PID" "$STARTER_START"; do
  [ -d "$STATEDIR" ] || exit 0
  sleep 0.5
done
log "running $STOP $STATEDIR --purge"
bash "$STOP" "$STATEDIR" --purge
exit 0
