#!/bin/bash
# realparts-lib.sh - what rspamd.sh, powerdns.sh and bind.sh share: one real daemon per state
# directory, on 127.0.0.1 only, on free ports. Source it after common.sh.
#
# Layout of an instance directory DIR (one part per DIR; DIR/.part names it):
#   DIR/env     the endpoints, KEY=VALUE lines (shell-sourceable), written once the part answers
#   DIR/pid     the daemon's PID (it leads its own process group: setsid)
#   DIR/log     its stdout+stderr (each daemon logs to the console here)
#   plus the part's own config and data files.
#
# Output convention of the scripts: stdout carries only the KEY=VALUE lines of DIR/env (so
# `eval "$(tests/infra/rspamd.sh start DIR)"` works); progress messages go to stderr.
#
# Ports: each start picks random free ports (common.sh pick_port: 20000-31999, nothing bound
# there, TCP and for DNS also UDP). Parallel starts of these scripts do not hand out the same
# port twice: a pick is recorded in $RP_PORTS_FILE (under flock) and skipped by the starts in
# other DIRs for 120 s, time enough for the daemon to bind it. Should a port still be taken by the time the
# daemon binds it (another program), the start is retried with new ports (3 tries).

RP_PORTS_FILE=${BACKUPMX_PORTS_FILE:-/tmp/backupmx-infra-ports}
RP_RESERVE_S=120

# rp_layout PART DIR: set RP_PART, RP_DIR (absolute), RP_PIDFILE, RP_LOG, RP_ENV
rp_layout() {
  RP_PART=$1
  RP_DIR=$(realpath -m "$2")
  RP_PIDFILE=$RP_DIR/pid
  RP_LOG=$RP_DIR/log
  RP_ENV=$RP_DIR/env
}

# rp_pid: print the daemon's PID when it runs (PID file + /proc/PID/comm check against COMM)
rp_pid() {
  local comm=$1 pid
  [ -s "$RP_PIDFILE" ] || return 1
  pid=$(tr -dc '0-9' < "$RP_PIDFILE")
  pid_is "$pid" "$comm" || return 1
  echo "$pid"
}

# rp_prepare COMM USER: create DIR for this part; refuse a DIR of another part or a running one.
# DIR becomes mode 755 and must be reachable by USER (the daemon's user).
rp_prepare() {
  local comm=$1 user=$2 other pid
  mkdir -p "$RP_DIR"
  other=$(cat "$RP_DIR/.part" 2> /dev/null || true)
  [ -z "$other" ] || [ "$other" = "$RP_PART" ] ||
    die "$RP_DIR holds a $other instance; give each part its own directory"
  if pid=$(rp_pid "$comm"); then die "$RP_PART in $RP_DIR already runs (PID $pid); stop it first"; fi
  echo "$RP_PART" > "$RP_DIR/.part"
  rp_reachable "$user" "$RP_DIR"
  rm -f "$RP_ENV" "$RP_PIDFILE"
}

# rp_reachable USER DIR: USER must be able to reach DIR. chmod 755 DIR (mktemp -d makes 700);
# a parent that denies search to USER is given o+x (search only) when it lies under the system
# temp dir (a mktemp -d parent); anywhere else we refuse and say why.
rp_reachable() {
  local u=$1 d=$2 p tmp=${TMPDIR:-/tmp}
  chmod 755 "$d"
  p=$(dirname "$d")
  while [ "$p" != / ]; do
    if ! setpriv --reuid="$u" --regid="$u" --clear-groups test -x "$p" 2> /dev/null; then
      case "$p/" in
        /tmp/?* | /var/tmp/?* | "${tmp%/}"/?*)
          log "giving $p o+x (search only) so that $u (the $RP_PART daemon) can reach $d"
          chmod o+x "$p" ;;
        *) die "$p is not searchable by user $u; $RP_PART needs it (chmod o+x $p)" ;;
      esac
    fi
    p=$(dirname "$p")
  done
  setpriv --reuid="$u" --regid="$u" --clear-groups test -x "$d" || die "$d is not reachable by user $u"
}

# rp_prev KEY: the value of KEY in the DIR/env of the previous start (empty when none)
rp_prev() {
  [ -f "$RP_DIR/env.last" ] || return 0
  sed -n "s/^$1=//p" "$RP_DIR/env.last" | tail -n1
}

# rp_port_of URL_OR_HOSTPORT: the port at its end (http://127.0.0.1:123 -> 123, 127.0.0.1:53 -> 53)
rp_port_of() { [[ "$1" =~ :([0-9]+)$ ]] && echo "${BASH_REMATCH[1]}"; }

# rp_port_free PORT [udp] [tw]: nothing listens/is bound on PORT (TCP; and UDP with "udp").
# With "tw", TCP sockets in TIME-WAIT do not count (our daemons bind with SO_REUSEADDR; used when
# a restart takes its previous port back: its last clients' connections linger in TIME-WAIT).
rp_port_free() {
  local ex=
  [ "${3:-}" = tw ] && ex="exclude time-wait"
  tcp_open "$1" && return 1
  # shellcheck disable=SC2086
  ss -Htan $ex "sport = :$1" 2> /dev/null | grep -q . && return 1
  if [ "${2:-}" = udp ] && ss -Huan "sport = :$1" 2> /dev/null | grep -q .; then return 1; fi
  return 0
}

# rp_pick_port VAR [udp] [WANT] [PREV]: store a port in VAR.
#   WANT (the caller's explicit choice, e.g. $RSPAMD_PORT): used as is; die when it is taken.
#   PREV (the port of the previous start in this DIR): reused when free, so a restart keeps its
#   endpoints. Otherwise a random free one, recorded in $RP_PORTS_FILE so that parallel starts
#   of these scripts never pick it during the next $RP_RESERVE_S seconds.
rp_pick_port() {
  local -n _rp_out=$1
  local udp=${2:-} want=${3:-} prev=${4:-} cand='' n now
  if [ -n "$want" ]; then
    [[ "$want" =~ ^[0-9]+$ ]] || die "port must be a number, not '$want'"
    rp_port_free "$want" "$udp" || die "127.0.0.1:$want (asked for) is already in use"
    PICKED_PORTS="$PICKED_PORTS$want "
    _rp_out=$want
    return 0
  fi
  # (fd 9: the lock on the reservation file; closed again before returning)
  exec 9>> "$RP_PORTS_FILE.lock"
  flock -w 60 9 || die "cannot lock $RP_PORTS_FILE.lock"
  now=$EPOCHSECONDS
  touch "$RP_PORTS_FILE"
  case "$PICKED_PORTS" in *" $prev "*) prev= ;; esac
  if [ -n "$prev" ] && rp_port_free "$prev" "$udp" tw && ! rp_reserved "$prev" "$now"; then
    cand=$prev
  fi
  for ((n = 0; n < 200 && ${#cand} == 0; n++)); do
    pick_port cand
    if ! rp_port_free "$cand" "$udp" || rp_reserved "$cand" "$now"; then cand=; fi
  done
  [ -n "$cand" ] || { exec 9>&-; die "no free port found on 127.0.0.1"; }
  { awk -v t=$((now - RP_RESERVE_S)) '$2 > t' "$RP_PORTS_FILE"; echo "$cand $now $RP_DIR"; } > "$RP_PORTS_FILE.new"
  mv -f "$RP_PORTS_FILE.new" "$RP_PORTS_FILE"
  exec 9>&-
  PICKED_PORTS="$PICKED_PORTS$cand " # (common.sh's memory: a second pick here never returns it)
  _rp_out=$cand
}

# rp_reserved PORT NOW: another DIR picked PORT during the last $RP_RESERVE_S seconds
# ($RP_PORTS_FILE lines: PORT EPOCH DIR)
rp_reserved() {
  awk -v p="$1" -v t=$(($2 - RP_RESERVE_S)) -v d="$RP_DIR" \
    '$1 == p && $2 > t && $3 != d { f = 1 } END { exit !f }' "$RP_PORTS_FILE"
}

# rp_spawn USER CMD...: run CMD as USER ("-": stay root; the daemon then drops privileges by
# itself) detached in its own session (setsid and setpriv exec, so the PID is CMD's), stdin
# /dev/null, output to DIR/log, PID to DIR/pid. Our extra descriptors (3: the env lines for the
# caller, 8/9: locks) are closed in it, or a caller reading our stdout through a pipe, or waiting
# for a lock, would wait for the daemon to exit.
rp_spawn() {
  local u=$1
  shift
  # (the subshell execs, so $! is the daemon's PID; its working directory is DIR)
  if [ "$u" = - ]; then
    (cd "$RP_DIR" && exec setsid "$@") > "$RP_LOG" 2>&1 < /dev/null 3>&- 8>&- 9>&- &
  else
    (cd "$RP_DIR" && exec setsid setpriv --reuid="$u" --regid="$u" --init-groups "$@") \
      > "$RP_LOG" 2>&1 < /dev/null 3>&- 8>&- 9>&- &
  fi
  echo $! > "$RP_PIDFILE"
}

# rp_wait SECONDS CHECK...: poll CHECK every 0.1 s until it succeeds. Fails when SECONDS pass, at
# once when the daemon died, or when its log says a port was in use (some daemons keep running).
rp_wait() {
  local limit=$1 pid i
  shift
  pid=$(tr -dc '0-9' < "$RP_PIDFILE")
  for ((i = 0; i < limit * 10; i++)); do
    "$@" > /dev/null 2>&1 && return 0
    alive "$pid" || return 1
    rp_port_clash && return 1
    sleep 0.1
  done
  return 1
}

# rp_port_clash: the daemon's log says one of its ports was taken (retry with other ports).
# rspamd and pdns_server say "Address already in use" (pdns exits, rspamd retries a few s, then
# exits); named says "creating IPv4 interface lo failed; interface ignored", then "unable to
# listen on any configured interfaces" and exits.
rp_port_clash() {
  grep -qi 'address already in use\|address in use\|creating IPv4 interface .* failed' "$RP_LOG" 2> /dev/null
}

# rp_show_log: the tail of DIR/log on stderr
rp_show_log() {
  echo "--- last lines of $RP_LOG" >&2
  tail -n 30 "$RP_LOG" >&2 2> /dev/null || true
}

# rp_stop COMM [WAIT_S]: stop the daemon by its PID file (only if /proc/PID/comm is still COMM),
# SIGTERM, then wait for it and the rest of its process group; SIGKILL after WAIT_S (default 15).
# Idempotent: nothing running is fine.
rp_stop() {
  local comm=$1 wait_s=${2:-15} pid t0=$EPOCHREALTIME
  if ! pid=$(rp_pid "$comm"); then
    log "$RP_PART in $RP_DIR is not running; nothing to stop"
    rm -f "$RP_PIDFILE"
    return 0
  fi
  stop_pid "$pid" "$comm" "$wait_s" TERM || warn "$RP_PART in $RP_DIR (PID $pid) had to be killed"
  rm -f "$RP_PIDFILE"
  log "$RP_PART in $RP_DIR stopped (PID $pid and its process group) in $(since "$t0")s"
}

# rp_status COMM: one line; 0 when running, 3 when not (LSB)
rp_status() {
  local pid
  if pid=$(rp_pid "$1"); then
    echo "running: $RP_PART PID $pid in $RP_DIR"
    [ -f "$RP_ENV" ] && cat "$RP_ENV"
    return 0
  fi
  echo "stopped: $RP_PART in $RP_DIR"
  return 3
}

# rp_write_env KEY=VALUE...: write DIR/env atomically (and env.last, for the next start's ports)
rp_write_env() {
  printf '%s\n' "$@" > "$RP_ENV.new"
  chmod 644 "$RP_ENV.new"
  cp -f "$RP_ENV.new" "$RP_DIR/env.last"
  mv -f "$RP_ENV.new" "$RP_ENV"
}

# rp_start_loop LAUNCH CHECK COMM WAIT_S WANTED RETRY_MSG FAIL_MSG: the start retry of rspamd.sh,
# powerdns.sh and bind.sh, kept in one place. Up to 3 tries of `LAUNCH TRY` (pick the ports,
# write the config, rp_spawn COMM), each waiting up to WAIT_S s for CHECK. A try whose port was
# taken meanwhile (rp_port_clash) is stopped and retried with new ports, unless WANTED (the
# ports the caller asked for) is non-empty or it was the third; any other failure shows the log,
# stops COMM and dies with FAIL_MSG.
rp_start_loop() {
  local _launch=$1 _check=$2 _comm=$3 _wait_s=$4 _wanted=$5 _retry_msg=$6 _fail_msg=$7 _try _rc
  for _try in 1 2 3; do
    "$_launch" "$_try"
    _rc=0
    rp_wait "$_wait_s" "$_check" || _rc=1
    [ "$_rc" = 0 ] && break
    if rp_port_clash && [ -z "$_wanted" ] && [ "$_try" -lt 3 ]; then
      warn "$_retry_msg"
      rp_stop "$_comm" 10
      rm -f "$RP_DIR/env.last"
      continue
    fi
    rp_show_log
    rp_stop "$_comm" 10
    die "$_fail_msg"
  done
}

# rp_main ACTION COMM: the three part scripts take the same actions; run ACTION for the daemon
# COMM: start (the script's cmd_start), stop (STOP_WAIT_S, default 15), status (to fd 3); else usage
rp_main() {
  case "$1" in
    start) cmd_start ;;
    stop) rp_stop "$2" "${STOP_WAIT_S:-15}" ;;
    status) rp_status "$2" >&3 ;;
    *) usage ;;
  esac
}
