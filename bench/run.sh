#!/bin/bash
# bench/run.sh - `make bench`: measure mx-pod against a tuned Postfix backup MX and against
# smtp-sink (the no-disk ceiling), on this machine, in one run, and print a table with the goals.
#
#   accept   smtp-source -s SESSIONS -m MESSAGES -l 4096 into (a) mx-pod holding everything
#            (workers 0), (b) Postfix backup MX holding (defer_transports=smtp), (c) smtp-sink;
#            msgs/s = MESSAGES / wall time of the whole smtp-source run (bash EPOCHREALTIME)
#   replay   the queued MESSAGES into a fresh smtp-sink with concurrency CONCURRENCY: mx-pod with
#            PUT /v1/replay {"workers":C,"rate_per_second":0} until GET /v1/queue says 0, Postfix
#            with `postqueue -f` (hold released first, not timed) until its queue is empty
#   restart  RESTART_MESSAGES queued in mx-pod; SIGTERM, start again, time until GET /readyz is
#            200, and RSS then; the same again after SIGKILL (crash recovery)
#   memory   BIG_SESSIONS smtp-source sessions each sending one BIG_SIZE message at once into
#            mx-pod (max_message_size 60 MiB, max_inflight_data 64 MiB): its peak RSS (VmHWM)
#   slow     bench/slow_peers.py: SMTP transaction latency alone, then while SLOW_CLIENTS SMTP
#            clients trickle a command and HALF_OPEN admin connections send nothing
# Goals: accept >= 3x Postfix and >= 70% of smtp-sink; replay >= 2x Postfix; restart < 2 s and
# RSS < 150 MiB; peak RSS with 100 x 50 MiB at once <= 256 MiB; every transaction under the
# slow/half-open load completes, median latency < 1 s. The script exits non-zero when a measurement failed (wrong counts, a timeout,
# a crash); missed goals only do so with BENCH_STRICT=1.
#
# Environment (defaults): MXPOD_BIN (target/release/mx-pod, relative to the repo root),
# BENCH_MESSAGES (20000), BENCH_SESSIONS (50), BENCH_SIZE (4096), CONCURRENCY (8),
# BENCH_RESTART_MESSAGES (100000), BENCH_BIG_SESSIONS (100), BENCH_BIG_SIZE (52428800),
# BENCH_SLOW_CLIENTS (1000), BENCH_HALF_OPEN (1000), BENCH_STEP_TIMEOUT (600 s per step), BENCH_KEEP (0; 1 keeps
# the work dir), BENCH_STRICT (0), BENCH_TMPDIR (/tmp; the queues of both servers go there).
# Run as root (Postfix master, smtp-sink -u). Only 127.0.0.1 is used; every process started
# here is stopped by its PID on exit (also on failure or Ctrl-C), and the work dir is removed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG_TAG=bench
# shellcheck source=tests/infra/common.sh
. "$ROOT/tests/infra/common.sh"

MXPOD_BIN=${MXPOD_BIN:-target/release/mx-pod}
N=${BENCH_MESSAGES:-20000}
SESSIONS=${BENCH_SESSIONS:-50}
SIZE=${BENCH_SIZE:-4096}
CONC=${CONCURRENCY:-8}
RESTART_N=${BENCH_RESTART_MESSAGES:-100000}
BIG_SESSIONS=${BENCH_BIG_SESSIONS:-100}
BIG_SIZE=${BENCH_BIG_SIZE:-52428800}
SLOW_CLIENTS=${BENCH_SLOW_CLIENTS:-1000}
HALF_OPEN=${BENCH_HALF_OPEN:-1000}
STEP_T=${BENCH_STEP_TIMEOUT:-600}
KEEP=${BENCH_KEEP:-0}
STRICT=${BENCH_STRICT:-0}
FROM=sender@sender.test
TO=user@example.test
export CONCURRENCY=$CONC   # postfix-backup.sh takes its smtp concurrency from it
export NO_COLOR=1          # mx-pod: plain log lines in its log file

need_root
need_cmd postfix postconf postqueue smtp-source smtp-sink curl python3 setsid setpriv timeout pgrep ps
for v in N SESSIONS SIZE CONC RESTART_N STEP_T BIG_SESSIONS BIG_SIZE SLOW_CLIENTS HALF_OPEN; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, not '${!v}'"
done
need_mxpod_bin # also sets MXPOD_COMM

WORK=$(mktemp -d "${BENCH_TMPDIR:-/tmp}/backupmx-bench.XXXXXX")
chmod 755 "$WORK"   # Postfix's unprivileged processes must reach its queue under WORK

# ---------------------------------------------------------------- clean-up on any exit
# Every background process is registered as WORK/NAME.pid + WORK/NAME.comm; the Postfix
# instance is stopped by its own script (master PID file).
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$? f name
  trap - EXIT INT TERM
  set +e
  for f in "$WORK"/*.pid; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .pid)
    stop_pid "$(cat "$f")" "$(cat "$WORK/$name.comm")" 10 TERM
    rm -f "$f"
  done
  if [ -d "$WORK/postfix/etc" ]; then
    STOP_WAIT_S=10 tests/infra/postfix-backup.sh stop "$WORK/postfix" > /dev/null
  fi
  if [ "$KEEP" = 1 ]; then
    log "work dir kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  [ "$rc" = 0 ] || log "FAILED (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ---------------------------------------------------------------- helpers
# bg NAME COMM CMD...: start CMD in the background (own session), register it for clean-up
bg() {
  local name=$1 comm=$2; shift 2
  echo "$comm" > "$WORK/$name.comm"
  spawn "$WORK/$name.log" "$WORK/$name.pid" "$@"
}
bg_pid() { cat "$WORK/$1.pid"; }
# bg_stop NAME [SIGNAL]: stop a registered process (and reap it); prints nothing
bg_stop() {
  local name=$1 sig=${2:-TERM} pid
  [ -e "$WORK/$name.pid" ] || return 0
  pid=$(bg_pid "$name")
  stop_pid "$pid" "$(cat "$WORK/$name.comm")" 30 "$sig" || true
  wait "$pid" 2> /dev/null || true
  rm -f "$WORK/$name.pid"
}

# start_sink NAME PORT: a fresh smtp-sink (-c: counters in WORK/NAME.log) on 127.0.0.1:PORT
start_sink() {
  local name=$1 port=$2
  bg "$name" smtp-sink smtp-sink -u nobody -c "127.0.0.1:$port" 256
  wait_tcp "$port" 10 "$(bg_pid "$name")" || die "smtp-sink $name did not start on $port"
}
# sink_count NAME: messages the sink received (last mesg= counter of smtp-sink -c)
sink_count() {
  local n
  n=$(tr '\r' '\n' < "$WORK/$1.log" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1)
  echo "${n:-0}"
}

# settle: write back dirty pages before a timed step, so no step pays for an earlier one's writes
settle() { sync; }

# source PORT COUNT: smtp-source COUNT messages into 127.0.0.1:PORT; sets SRC_SECS and SRC_RC
source_run() {
  local port=$1 count=$2 t0
  settle
  log "smtp-source -s $SESSIONS -m $count -l $SIZE -f $FROM -t $TO 127.0.0.1:$port"
  t0=$(now)
  SRC_RC=0
  timeout -k 10 "$STEP_T" smtp-source -s "$SESSIONS" -m "$count" -l "$SIZE" -f "$FROM" -t "$TO" \
    "127.0.0.1:$port" > "$WORK/source.out" 2>&1 || SRC_RC=$?
  SRC_SECS=$(since "$t0")
  log "  smtp-source exit $SRC_RC after ${SRC_SECS}s ($(rate "$count" "$SRC_SECS") msgs/s)"
  if [ "$SRC_RC" != 0 ]; then
    tail -n 5 "$WORK/source.out" | sed 's/^/    /'
  fi
}

rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print "inf" }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
# goal A OP B: print "ok" when A OP B holds (OP is >= or <; decimals allowed), else "MISSED"
goal() {
  awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN {
    if (a !~ /^[0-9.]+$/) { print "MISSED"; exit }
    ok = (op == ">=") ? (a + 0 >= b + 0) : (a + 0 < b + 0); print (ok ? "ok" : "MISSED") }'
}

# ---- mx-pod helpers
TOKEN=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
printf '%s\n' "$TOKEN" > "$WORK/admin-token"
chmod 600 "$WORK/admin-token"

# mxpod_config FILE QUEUE_DIR SMTP_PORT ADMIN_PORT PRIMARY_PORT: workers 0, no auto, unlimited
mxpod_config() {
  cat > "$1" << EOF
# written by bench/run.sh
hostname = "mx2.example.test"
[smtp]
listen = ["127.0.0.1:$3"]
max_message_size = 62914560
max_recipients = 100
max_connections = 3000
# all the load comes from one loopback client: no per-client limits
max_connections_per_ip = 5000
max_messages_per_minute = 0
max_recipients_per_minute = 0
[queue]
dir = "$2"
retention = "5d"
delay_warning = "4h"
max_bytes = "8GiB"
[admin]
listen = "127.0.0.1:$4"
token_file = "$WORK/admin-token"
[replay]
workers = 0
auto = false
rate_per_second = 0
max_messages_per_connection = 100
[dsn]
relay = "127.0.0.1:$5"
[[domains]]
name = "example.test"
primary = "127.0.0.1:$5"
EOF
}
api() { curl -sS -m 5 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$ADMIN/$1"; }
readyz_code() { curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:$ADMIN/readyz" || true; }
mx_count() { api v1/queue | json_get messages; }
# mx_count_light: the same without starting python (used in tight polling loops, so that the
# poller takes as little CPU as possible from the server it measures): the top-level "messages"
# from the part of the answer before the per-domain list; python only as a fall-back
mx_count_light() {
  local json head
  json=$(api v1/queue 2> /dev/null) || return 1
  head=${json%%\"domains\"*}
  if [[ "$head" =~ \"messages\":([0-9]+) ]]; then
    echo "${BASH_REMATCH[1]}"
  else
    json_get messages <<< "$json"
  fi
}
# mx_start NAME CONFIG: start mx-pod, wait for /readyz 200; sets READY_SECS (spawn -> 200)
mx_start() {
  local name=$1 cfg=$2 t0 i code=
  t0=$(now)
  bg "$name" "$MXPOD_COMM" "$MXPOD_BIN" serve --config "$cfg"
  for ((i = 0; i < STEP_T * 50; i++)); do
    code=$(readyz_code)
    [ "$code" = 200 ] && break
    alive "$(bg_pid "$name")" || { tail -n 30 "$WORK/$name.log" >&2; die "mx-pod ($name) exited during start-up"; }
    sleep 0.02
  done
  READY_SECS=$(since "$t0")
  [ "$code" = 200 ] || { tail -n 30 "$WORK/$name.log" >&2; die "mx-pod ($name): /readyz not 200 after ${STEP_T}s"; }
}
# mx_wait_count EXPECTED: poll the queue count until it equals EXPECTED (max 30 s)
mx_wait_count() {
  local i c=
  for ((i = 0; i < 150; i++)); do
    c=$(mx_count) || c=
    [ "$c" = "$1" ] && { echo "$c"; return 0; }
    sleep 0.2
  done
  echo "${c:-?}"
  return 1
}

FAILS=()   # measurement problems (wrong counts etc.); any makes the exit code non-zero
fail() { warn "$*"; FAILS+=("$*"); }

# ---------------------------------------------------------------- machine
log "work dir $WORK ($(df -PT "$WORK" | awk 'NR == 2 { print $2 " on " $7 }')), $(nproc) cores, $(uname -r)"
log "load average now: $(cut -d' ' -f1-3 /proc/loadavg) (figures are only comparable on an otherwise idle machine)"
log "mx-pod: $MXPOD_BIN; Postfix $(postconf -d -h mail_version 2> /dev/null)"
log "messages $N x $SIZE B, $SESSIONS sessions; replay concurrency $CONC; restart with $RESTART_N queued"
T_ALL=$(now)

# ---------------------------------------------------------------- 1. smtp-sink ceiling
log "==> [1/6] accept ceiling: smtp-sink (no disk)"
pick_port P_SINK0
bg sink0 smtp-sink smtp-sink -u nobody "127.0.0.1:$P_SINK0" 256
wait_tcp "$P_SINK0" 10 "$(bg_pid sink0)" || die "smtp-sink did not start"
source_run "$P_SINK0" "$N"
SINK_ACCEPT_S=$SRC_SECS
[ "$SRC_RC" = 0 ] || fail "smtp-source into smtp-sink exited $SRC_RC"
bg_stop sink0

# ---------------------------------------------------------------- 2. Postfix backup MX
log "==> [2/6] Postfix backup MX: accept (holding), then flush into a fresh smtp-sink"
pick_port P_PF
pick_port P_PFSINK
PFDIR=$WORK/postfix
tests/infra/postfix-backup.sh start "$PFDIR" "$P_PF" "127.0.0.1:$P_PFSINK"
source_run "$P_PF" "$N"
PF_ACCEPT_S=$SRC_SECS
[ "$SRC_RC" = 0 ] || fail "smtp-source into Postfix exited $SRC_RC"
# let qmgr finish moving the held mail to deferred/ (so the flush starts from a quiet queue)
log "waiting for Postfix's qmgr to finish deferring the held mail"
for ((i = 0; i < STEP_T * 2; i++)); do
  busy=$(find "$PFDIR/spool/incoming" "$PFDIR/spool/active" -type f | wc -l)
  [ "$busy" = 0 ] && break
  sleep 0.5
done
PF_QUEUED=$(tests/infra/postfix-backup.sh count "$PFDIR")
log "  Postfix queue: $PF_QUEUED messages (quiet after $(since "$T_ALL")s of bench)"
[ "$PF_QUEUED" = "$N" ] || fail "Postfix queued $PF_QUEUED messages, expected $N"
start_sink pfsink "$P_PFSINK"
tests/infra/postfix-backup.sh release "$PFDIR"
settle
log "postqueue -f; timing until the Postfix queue is empty"
t0=$(now)
postqueue -c "$PFDIR/etc" -f
left=$PF_QUEUED
q=$PFDIR/spool
for ((i = 0; i < STEP_T * 10; i++)); do
  # light poll (no sort, no script start-up); the exact count below confirms the end
  [ "$(find "$q/incoming" "$q/active" "$q/deferred" "$q/hold" -type f | wc -l)" = 0 ] && break
  sleep 0.1
done
PF_REPLAY_S=$(since "$t0")
left=$(tests/infra/postfix-backup.sh count "$PFDIR")
PF_SUNK=$(sink_count pfsink)
log "  Postfix flushed in ${PF_REPLAY_S}s ($(rate "$N" "$PF_REPLAY_S") msgs/s); left $left; sink got $PF_SUNK"
[ "$left" = 0 ] || fail "Postfix queue not empty after ${STEP_T}s ($left left)"
[ "$PF_SUNK" = "$N" ] || fail "Postfix's sink received $PF_SUNK messages, expected $N"
tests/infra/postfix-backup.sh stop "$PFDIR"
bg_stop pfsink
rm -rf "$PFDIR/spool"   # free the disk space before mx-pod runs

# ---------------------------------------------------------------- 3. mx-pod accept + replay
log "==> [3/6] mx-pod: accept (workers 0), then replay into a fresh smtp-sink"
pick_port P_MX
pick_port ADMIN
pick_port P_MXSINK
mxpod_config "$WORK/mx-pod.toml" "$WORK/mxq" "$P_MX" "$ADMIN" "$P_MXSINK"
mx_start mxpod "$WORK/mx-pod.toml"
log "  mx-pod ready in ${READY_SECS}s (PID $(bg_pid mxpod), SMTP $P_MX, admin $ADMIN)"
source_run "$P_MX" "$N"
MX_ACCEPT_S=$SRC_SECS
[ "$SRC_RC" = 0 ] || fail "smtp-source into mx-pod exited $SRC_RC"
MX_QUEUED=$(mx_wait_count "$N") || true
log "  mx-pod queue (GET /v1/queue): $MX_QUEUED messages"
[ "$MX_QUEUED" = "$N" ] || fail "mx-pod queued $MX_QUEUED messages, expected $N"
start_sink mxsink "$P_MXSINK"
settle
log "PUT /v1/replay {\"workers\":$CONC,\"rate_per_second\":0}; timing until the queue is empty"
t0=$(now)
code=$(curl -sS -m 5 -o "$WORK/put.out" -w '%{http_code}' -X PUT \
  -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d "{\"workers\":$CONC,\"rate_per_second\":0}" "http://127.0.0.1:$ADMIN/v1/replay") || true
case "$code" in 2??) ;; *) cat "$WORK/put.out" >&2 || true; die "PUT /v1/replay answered '$code'" ;; esac
left=$MX_QUEUED
for ((i = 0; i < STEP_T * 10; i++)); do
  left=$(mx_count_light) || left='?'
  [ "$left" = 0 ] && break
  sleep 0.1
done
MX_REPLAY_S=$(since "$t0")
MX_SUNK=$(sink_count mxsink)
log "  mx-pod replayed in ${MX_REPLAY_S}s ($(rate "$N" "$MX_REPLAY_S") msgs/s); left $left; sink got $MX_SUNK"
[ "$left" = 0 ] || fail "mx-pod queue not empty after ${STEP_T}s ($left left)"
[ "$MX_SUNK" = "$N" ] || fail "mx-pod's sink received $MX_SUNK messages, expected $N"
bg_stop mxpod
bg_stop mxsink
rm -rf "$WORK/mxq"

# ---------------------------------------------------------------- 4. mx-pod restart
log "==> [4/6] mx-pod restart with $RESTART_N messages queued"
pick_port P_MXR
pick_port ADMIN
pick_port P_DEAD   # nothing listens there: replay is held anyway (workers 0)
mxpod_config "$WORK/mx-pod-r.toml" "$WORK/mxq-r" "$P_MXR" "$ADMIN" "$P_DEAD"
mx_start mxr "$WORK/mx-pod-r.toml"
source_run "$P_MXR" "$RESTART_N"
[ "$SRC_RC" = 0 ] || fail "smtp-source ($RESTART_N messages) into mx-pod exited $SRC_RC"
R_QUEUED=$(mx_wait_count "$RESTART_N") || true
RSS_BEFORE=$(ps -o rss= -p "$(bg_pid mxr)" | tr -d ' ')
log "  queued: $R_QUEUED; RSS before restart $((RSS_BEFORE / 1024)) MiB; $(du -sh "$WORK/mxq-r" | cut -f1) on disk"
[ "$R_QUEUED" = "$RESTART_N" ] || fail "mx-pod queued $R_QUEUED messages, expected $RESTART_N"

declare -A RESTART_S RESTART_RSS
for sig in TERM KILL; do
  settle
  pid=$(bg_pid mxr)
  t0=$(now)
  # (stderr off meanwhile: bash reports a child killed by a signal as "Killed" when it reaps it)
  exec 3>&2 2> /dev/null
  kill -"$sig" "$pid"
  # wait (bounded) until it is gone; alive() treats our unreaped zombie child as gone
  for ((i = 0; i < 60 * 20; i++)); do alive "$pid" || break; sleep 0.05; done
  hung=0
  if alive "$pid"; then
    hung=1
    kill -KILL "$pid" || true
  fi
  rc=0
  wait "$pid" || rc=$?
  exec 2>&3 3>&-
  [ "$hung" = 0 ] || fail "mx-pod still ran 60 s after SIG$sig; killed it"
  rm -f "$WORK/mxr.pid"
  log "  SIG$sig: mx-pod exited with status $rc after $(since "$t0")s"
  if [ "$sig" = TERM ] && [ "$rc" != 0 ]; then fail "mx-pod exited $rc on SIGTERM (expected 0)"; fi
  mv "$WORK/mxr.log" "$WORK/mxr-before-$sig.log"
  mx_start mxr "$WORK/mx-pod-r.toml"
  RESTART_S[$sig]=$READY_SECS
  RESTART_RSS[$sig]=$(ps -o rss= -p "$(bg_pid mxr)" | tr -d ' ')
  after=$(mx_wait_count "$RESTART_N") || true
  log "  restart after SIG$sig: /readyz 200 after ${READY_SECS}s, RSS $((RESTART_RSS[$sig] / 1024)) MiB, queue $after"
  [ "$after" = "$RESTART_N" ] || fail "after SIG$sig and restart mx-pod reports $after messages, expected $RESTART_N"
done
bg_stop mxr
rm -rf "$WORK/mxq-r"

# ---------------------------------------------------------------- 5. memory under large messages
log "==> [5/6] mx-pod: $BIG_SESSIONS sessions each sending a $((BIG_SIZE >> 20)) MiB message at once"
pick_port P_MXB
pick_port ADMIN
pick_port P_DEAD
mxpod_config "$WORK/mx-pod-b.toml" "$WORK/mxq-b" "$P_MXB" "$ADMIN" "$P_DEAD"
mx_start mxb "$WORK/mx-pod-b.toml"
t0=$(now)
SRC_RC=0
timeout "$STEP_T" smtp-source -s "$BIG_SESSIONS" -m "$BIG_SESSIONS" -l "$BIG_SIZE" -f "$FROM" -t "$TO" \
  "127.0.0.1:$P_MXB" > "$WORK/source-big.log" 2>&1 || SRC_RC=$?
BIG_S=$(since "$t0")
[ "$SRC_RC" = 0 ] || fail "smtp-source ($BIG_SESSIONS x $BIG_SIZE B) into mx-pod exited $SRC_RC"
BIG_QUEUED=$(mx_wait_count "$BIG_SESSIONS") || true
BIG_PEAK=$(awk '/^VmHWM:/ { print $2 }' "/proc/$(bg_pid mxb)/status")
log "  queued $BIG_QUEUED in ${BIG_S}s; peak RSS $((BIG_PEAK / 1024)) MiB"
[ "$BIG_QUEUED" = "$BIG_SESSIONS" ] || fail "mx-pod queued $BIG_QUEUED large messages, expected $BIG_SESSIONS"
bg_stop mxb
rm -rf "$WORK/mxq-b"

# ---------------------------------------------------------------- 6. slow and half-open peers
log "==> [6/6] mx-pod: SMTP latency alone, then with $SLOW_CLIENTS trickling SMTP clients and $HALF_OPEN half-open admin connections"
pick_port P_MXS
pick_port ADMIN
pick_port P_DEAD
mxpod_config "$WORK/mx-pod-s.toml" "$WORK/mxq-s" "$P_MXS" "$ADMIN" "$P_DEAD"
mx_start mxs "$WORK/mx-pod-s.toml"
read -r SLOW_BASE_MED SLOW_BASE_MAX SLOW_MED SLOW_MAX SLOW_OK SLOW_HELD HALF_HELD < <(
  ulimit -n 8192
  timeout 150 python3 bench/slow_peers.py "$P_MXS" "$ADMIN" "$SLOW_CLIENTS" "$HALF_OPEN" 20
) || fail "bench/slow_peers.py failed"
log "  latency alone: median ${SLOW_BASE_MED:-?} ms (max ${SLOW_BASE_MAX:-?}); loaded: median ${SLOW_MED:-?} ms (max ${SLOW_MAX:-?}), $SLOW_OK/20 ok; held $SLOW_HELD slow, $HALF_HELD half-open"
[ "${SLOW_HELD:-0}" = "$SLOW_CLIENTS" ] || fail "only ${SLOW_HELD:-0} of $SLOW_CLIENTS slow clients were held"
bg_stop mxs

# ---------------------------------------------------------------- results
pf_acc=$(rate "$N" "$PF_ACCEPT_S")
mx_acc=$(rate "$N" "$MX_ACCEPT_S")
sk_acc=$(rate "$N" "$SINK_ACCEPT_S")
pf_rep=$(rate "$N" "$PF_REPLAY_S")
mx_rep=$(rate "$N" "$MX_REPLAY_S")
acc_vs_pf=$(ratio "$mx_acc" "$pf_acc")
acc_vs_sink=$(awk -v a="$mx_acc" -v b="$sk_acc" 'BEGIN { printf "%.0f", 100 * a / b }')
rep_vs_pf=$(ratio "$mx_rep" "$pf_rep")
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
acc_goal=$(goal "$acc_vs_pf" '>=' 3)
[ "$(goal "$acc_vs_sink" '>=' 70)" = ok ] || acc_goal=MISSED
MISSED=0
row() { printf '%-31s %9s %9s %9s   %-24s %-28s %s\n' "$@"; [ "${7:-}" = MISSED ] && MISSED=$((MISSED + 1)); return 0; }

echo
echo "backupmx bench: $N msgs x $SIZE B, $SESSIONS smtp-source sessions, replay concurrency $CONC," \
  "$(nproc) cores, queue on $(df -PT "$WORK" | awk 'NR == 2 { print $2 }'); total $(since "$T_ALL")s"
row "metric" "mx-pod" "Postfix" "smtp-sink" "mx-pod vs others" "goal" "result"
row "----------------------------" "------" "-------" "---------" "----------------" "----" "------"
row "accept (msgs/s)" "$mx_acc" "$pf_acc" "$sk_acc" "${acc_vs_pf}x Pf, ${acc_vs_sink}% sink" \
  ">= 3x Postfix, >= 70% sink" "$acc_goal"
row "replay (msgs/s)" "$mx_rep" "$pf_rep" "-" "${rep_vs_pf}x Postfix" ">= 2x Postfix" \
  "$(goal "$rep_vs_pf" '>=' 2)"
for sig in TERM KILL; do
  row "restart after SIG$sig (s)" "${RESTART_S[$sig]}" "-" "-" "$RESTART_N queued" "< 2 s to /readyz 200" \
    "$(goal "${RESTART_S[$sig]}" '<' 2)"
  row "RSS after SIG$sig restart (MiB)" "$(mib "${RESTART_RSS[$sig]}")" "-" "-" "$RESTART_N queued" "< 150 MiB" \
    "$(goal "$(mib "${RESTART_RSS[$sig]}")" '<' 150)"
done
row "peak RSS, ${BIG_SESSIONS} x $((BIG_SIZE >> 20)) MiB at once" "$(mib "$BIG_PEAK")" "-" "-" "in ${BIG_S}s, $BIG_QUEUED queued" "<= 256 MiB" \
  "$(goal "$(mib "$BIG_PEAK")" '<' 256.1)"
row "SMTP latency (ms, median)" "${SLOW_MED:-?}" "-" "-" "alone ${SLOW_BASE_MED:-?} ms" "all ok, < 1000 ms" \
  "$( [ "${SLOW_OK:-0}" = 20 ] && goal "${SLOW_MED:-99999}" '<' 1000 || echo MISSED)"
echo "  (with $SLOW_CLIENTS slow SMTP clients and $HALF_OPEN half-open admin connections held; max ${SLOW_MAX:-?} ms, alone max ${SLOW_BASE_MAX:-?} ms)"
echo
echo "times: accept mx-pod ${MX_ACCEPT_S}s, Postfix ${PF_ACCEPT_S}s, smtp-sink ${SINK_ACCEPT_S}s;" \
  "replay mx-pod ${MX_REPLAY_S}s, Postfix ${PF_REPLAY_S}s; mx-pod RSS with $RESTART_N queued before restart $(mib "$RSS_BEFORE") MiB"
if [ "${#FAILS[@]}" -gt 0 ]; then
  echo "measurement problems (${#FAILS[@]}):"
  printf '  - %s\n' "${FAILS[@]}"
  exit 1
fi
echo "goals: $((8 - MISSED)) met, $MISSED missed"
if [ "$STRICT" = 1 ] && [ "$MISSED" -gt 0 ]; then exit 1; fi
exit 0
