#!/bin/bash
# common.sh - shell helpers shared by tests/infra/*.sh, bench/*.sh and demo/*.sh.
# Source it; it does nothing by itself:   . "$(dirname "${BASH_SOURCE[0]}")/common.sh"
#
# Conventions: every helper only ever touches 127.0.0.1; processes are stopped by the PID we
# recorded (checked against /proc/PID/comm so a reused PID is never signalled), never by name.
# The caller sets LOG_TAG (default: its script name) for the "[tag] ..." prefix of messages.

# shellcheck disable=SC2034  # variables here are used by the scripts that source this file
LOG_TAG=${LOG_TAG:-$(basename "$0" .sh)}
export LC_ALL=C

log() { printf '[%s] %s\n' "$LOG_TAG" "$*"; }
warn() { printf '[%s] WARNING: %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] ERROR: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

# usage_exit FIRST LAST: the scripts keep their usage in their header comment, so one way to show
# it: print lines FIRST..LAST of the calling script's file, comment marks stripped, to stderr; exit 2
usage_exit() {
  sed -n "$1,$2p" "${BASH_SOURCE[1]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (Postfix's master and smtp-sink -u need it)"; }
need_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" > /dev/null || die "$c not found; run tests/infra/deps.sh (as root) first"
  done
}

# need_mxpod_bin: bench/run.sh and demo/standalone.sh both run the mx-pod binary MXPOD_BIN: it
# must be executable; it is made absolute, and MXPOD_COMM is what /proc/PID/comm shows for it
need_mxpod_bin() {
  [ -x "$MXPOD_BIN" ] || die "mx-pod binary $MXPOD_BIN not found (cargo build --release -p mx-pod, or set MXPOD_BIN)"
  MXPOD_BIN=$(realpath "$MXPOD_BIN")
  MXPOD_COMM=$(basename "$MXPOD_BIN" | cut -c1-15)
}

# now: seconds since the epoch with microseconds, e.g. 1732550000.123456 (no fork)
now() { printf '%s' "$EPOCHREALTIME"; }
# since T0: seconds elapsed since T0 (a value of now), 3 decimals
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'; }

# tcp_open PORT: true if something accepts TCP connections on 127.0.0.1:PORT
tcp_open() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }

# wait_tcp PORT SECONDS [PID]: poll until 127.0.0.1:PORT accepts; false after SECONDS, or at once
# when PID (if given) has died
wait_tcp() {
  local port=$1 limit=$2 pid=${3:-} i
  for ((i = 0; i < limit * 20; i++)); do
    tcp_open "$port" && return 0
    if [ -n "$pid" ] && ! alive "$pid"; then return 1; fi
    sleep 0.05
  done
  return 1
}

# wait_tcp_closed PORT SECONDS: poll until nothing accepts on 127.0.0.1:PORT any more
wait_tcp_closed() {
  local port=$1 limit=$2 i
  for ((i = 0; i < limit * 20; i++)); do
    tcp_open "$port" || return 0
    sleep 0.05
  done
  return 1
}

# pick_port VAR: store a free TCP port of 127.0.0.1 in VAR. A port counts as free when nothing
# accepts on it, no socket is bound to it (ss), and this shell has not handed it out before.
# Ports are picked at random from 20000-31999: above the usual fixed test ports (2525, 8025...)
# and below Linux's ephemeral range (32768-60999), so outgoing connections never take them.
PICKED_PORTS=" "
pick_port() {
  local -n _out=$1
  local p i
  for ((i = 0; i < 500; i++)); do
    p=$((20000 + RANDOM % 12000))
    case "$PICKED_PORTS" in *" $p "*) continue ;; esac
    tcp_open "$p" && continue
    # also skip ports that some socket uses without listening (ss from iproute2)
    if command -v ss > /dev/null && ss -Htan "sport = :$p" 2> /dev/null | grep -q .; then continue; fi
    PICKED_PORTS="$PICKED_PORTS$p "
    _out=$p
    return 0
  done
  die "no free TCP port found on 127.0.0.1"
}

# alive PID (and the stop helpers of the kube and node tiers): in proc-lib.sh, which the scripts
# that do not source this file share with it
# shellcheck source=tests/infra/proc-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/proc-lib.sh"

# pid_is PID COMM: PID is alive and its /proc/PID/comm is COMM (guards against PID reuse)
pid_is() {
  [ -n "$1" ] && [ "$(cat /proc/"$1"/comm 2> /dev/null)" = "$2" ] && alive "$1"
}

# stop_pid PID COMM [WAIT_S] [SIGNAL]: send SIGNAL (default TERM) to PID if it is still COMM,
# wait up to WAIT_S (default 15) s for it to go, then SIGKILL. When PID leads a process group
# (setsid), also wait for the rest of that group (e.g. Postfix smtpd children still holding the
# listening socket) and SIGKILL the group if it outlives WAIT_S. Returns 0 when all is gone.
stop_pid() {
  local pid=$1 comm=$2 wait_s=${3:-15} sig=${4:-TERM} i leader=0 rc=0
  [ -n "$pid" ] || return 0
  pid_is "$pid" "$comm" || return 0
  [ "$(ps -o pgid= -p "$pid" 2> /dev/null | tr -d ' ')" = "$pid" ] && leader=1
  kill -"$sig" "$pid" 2> /dev/null || true
  for ((i = 0; i < wait_s * 20; i++)); do pid_is "$pid" "$comm" || break; sleep 0.05; done
  if pid_is "$pid" "$comm"; then
    warn "$comm (PID $pid) still running ${wait_s}s after SIG$sig; sending SIGKILL"
    kill -KILL "$pid" 2> /dev/null || true
    rc=1
  fi
  [ "$leader" = 1 ] || return "$rc"
  for ((i = 0; i < wait_s * 20; i++)); do group_alive "$pid" || return "$rc"; sleep 0.05; done
  warn "processes of group $pid ($comm) outlived ${wait_s}s; sending SIGKILL to the group"
  kill -KILL -- "-$pid" 2> /dev/null || true
  sleep 0.2
  return 1
}

# group_alive PGID: some non-zombie process is left in process group PGID
group_alive() {
  local p
  for p in $(pgrep -g "$1" 2> /dev/null); do alive "$p" && return 0; done
  return 1
}

# make_reachable DIR: services running as postfix/nobody must be able to reach DIR. chmod 755
# DIR itself (mktemp -d makes it 700). A parent that denies search to others is given o+x
# (search only, never read) when it lies under the system temp dir (a mktemp -d parent);
# anywhere else we refuse and say why.
make_reachable() {
  local d=$1 p tmp=${TMPDIR:-/tmp}
  chmod 755 "$d"
  p=$(dirname "$d")
  while [ "$p" != / ]; do
    if ! setpriv --reuid=nobody --regid=nogroup --clear-groups test -x "$p" 2> /dev/null; then
      case "$p/" in
        /tmp/?* | /var/tmp/?* | "${tmp%/}"/?*)
          log "giving $p o+x (search only) so that Postfix's unprivileged processes can reach $d"
          chmod o+x "$p" ;;
        *) die "$p is not searchable by unprivileged users; Postfix needs it (chmod o+x $p)" ;;
      esac
    fi
    p=$(dirname "$p")
  done
  setpriv --reuid=nobody --regid=nogroup --clear-groups test -x "$d" ||
    die "$d is not reachable by unprivileged users"
}

# json_get FIELD: read a JSON object on stdin and print its top-level FIELD (python3, exact
# parsing); false, printing nothing, when the input is no JSON object or lacks FIELD
json_get() {
  python3 -c '
import json, sys
try:
    v = json.load(sys.stdin)[sys.argv[1]]
except Exception:
    sys.exit(1)
print(json.dumps(v) if isinstance(v, (dict, list, bool)) else v)' "$1"
}

# spawn LOGFILE PIDFILE CMD...: run CMD detached in its own session (setsid; it leads its own
# process group, so stop_pid can also wait for its children), stdin /dev/null, stdout+stderr to
# LOGFILE, PID to PIDFILE. setsid does not fork here (a background job is no group leader), so
# $! is CMD itself.
spawn() {
  local lf=$1 pf=$2; shift 2
  setsid "$@" > "$lf" 2>&1 < /dev/null &
  echo $! > "$pf"
}
