#!/bin/bash
# watchdog.sh - started by start.sh (detached: setsid nohup, PID in STATEDIR/watchdog.pid) when
# KNODE_OWNER_PID is set; not meant to be run by hand. The node's twin of
# tests/infra/kube/watchdog.sh.
#
#   watchdog.sh STATEDIR OWNER_PID OWNER_START STARTER_PID STARTER_START
#
# Every second: is OWNER_PID still alive and still the same process (its /proc/PID/stat start
# time = OWNER_START, so a reused PID does not count)? Once it is gone, wait for start.sh
# (STARTER_PID, same check) to finish, then run `stop.sh STATEDIR --purge` (processes, pod
# sandboxes, bridge, iptables chains, cgroups, sysctls, host dirs) and exit. Exits quietly when
# STATEDIR disappears (stop.sh --purge ran) and is stopped by stop.sh otherwise.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATEDIR=${1:?} OWNER_PID=${2:?} OWNER_START=${3:?} STARTER_PID=${4:?} STARTER_START=${5:?}
log() { printf '[node-watchdog %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

starttime() { { sed 's/.*) //' "/proc/$1/stat" 2> /dev/null || true; } | cut -d' ' -f20; }
# same PID PID_START: PID runs, started at PID_START, and is not all zombie
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
log "running stop.sh $STATEDIR --purge"
bash "$HERE/stop.sh" "$STATEDIR" --purge
exit 0
