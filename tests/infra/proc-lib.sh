#!/bin/bash
# proc-lib.sh - process helpers without side effects, for the scripts that cannot source all of
# common.sh (it exports LC_ALL=C and sets LOG_TAG): deps.sh, kube/stop.sh, node/stop.sh.
# common.sh sources it too. Source it; it does nothing by itself.

# alive PID: some thread of PID is not a zombie (a multi-threaded program's main thread can be a
# zombie while its other threads still run; an unreaped dead child is all zombie)
alive() {
  local t s
  for t in /proc/"$1"/task/*/stat; do
    s=$(sed 's/.*) //' "$t" 2> /dev/null | cut -c1)
    [ -n "$s" ] && [ "$s" != Z ] && return 0
  done
  return 1
}

# term_wait_kill ALIVE PID TENTHS: one SIGTERM-then-SIGKILL for both stop.sh of the kube and node
# tiers: SIGTERM PID, wait up to TENTHS x 0.1 s while `ALIVE PID` holds, then SIGKILL
term_wait_kill() {
  local is_alive=$1 pid=$2 tenths=$3
  kill -TERM "$pid" 2> /dev/null
  for _ in $(seq 1 "$tenths"); do "$is_alive" "$pid" || break; sleep 0.1; done
  if "$is_alive" "$pid"; then kill -KILL "$pid" 2> /dev/null; sleep 0.2; fi
}

# stop_watchdog STATEDIR ALIVE: the kube and node tiers start the same watchdog, so one stop for
# it: the setsid'd `bash watchdog.sh STATEDIR ...` of STATEDIR/watchdog.pid (it leads its own
# process group), checked by its command line; `ALIVE PID` tells whether it still runs. Uses the
# caller's log.
stop_watchdog() {
  local statedir=$1 is_alive=$2 f=$1/watchdog.pid pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ "$pid" = "$$" ] || [ "$pid" = "$PPID" ]; then
    rm -f "$f" # the watchdog is the caller: it exits by itself after this
    return 0
  fi
  if [ -n "$pid" ] && "$is_alive" "$pid" &&
    tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | grep -qF "watchdog.sh $statedir "; then
    kill -TERM -- "-$pid" 2> /dev/null || kill -TERM "$pid" 2> /dev/null
    for _ in $(seq 1 20); do "$is_alive" "$pid" || break; sleep 0.1; done
    "$is_alive" "$pid" && kill -KILL -- "-$pid" 2> /dev/null
    log "stopped watchdog (pid $pid)"
  fi
  rm -f "$f"
}
