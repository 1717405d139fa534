#!/bin/bash
# demo/standalone.sh - `make demo`: mx-pod as a standalone backup MX in front of a real Postfix
# primary, through an outage of the primary and its recovery. Meant to be watched: every step
# is announced with a banner and shows the real output of the tools.
#
#   1 start a Postfix primary for example.test      (tests/infra/postfix-primary.sh)
#   2 write an mx-pod config and start mx-pod        (replay.auto = true: it probes the primary)
#   3 stop the primary                               (simulated outage)
#   4 send DEMO_MESSAGES messages to mx-pod (swaks), subjects "demo message 001".."NNN"
#   5 show the queue                                 (mx-pod queue list)
#   6 start the primary again                        (same state dir: end of the outage)
#   7 watch the replay                               (GET /v1/queue every second, bounded)
#   8 check the primary's maildir: every message exactly once, in arrival order
#   9 summary table; everything is stopped and removed on exit (also on failure or Ctrl-C)
#
# Environment (defaults): MXPOD_BIN (target/release/mx-pod, relative to the repo root),
# DEMO_MESSAGES (20), DEMO_RATE (5 messages/s replay limit, so the progress can be watched;
# 0 = unlimited), DEMO_WORKERS (1), DEMO_REPLAY_TIMEOUT (120 s), DEMO_KEEP (0; 1 keeps the work
# dir). Run as root. Only 127.0.0.1 is used. Exit status 0 only when everything checked out.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG_TAG=demo
# shellcheck source=tests/infra/common.sh
. "$ROOT/tests/infra/common.sh"
# shellcheck source=demo/demo-lib.sh
. "$ROOT/demo/demo-lib.sh"

MXPOD_BIN=${MXPOD_BIN:-target/release/mx-pod}
N=${DEMO_MESSAGES:-20}
RATE=${DEMO_RATE:-5}
WORKERS=${DEMO_WORKERS:-1}
REPLAY_T=${DEMO_REPLAY_TIMEOUT:-120}
KEEP=${DEMO_KEEP:-0}
STEPS=9

need_root
need_cmd postfix postconf smtp-sink swaks curl python3 setsid setpriv pgrep
[[ "$N" =~ ^[1-9][0-9]*$ && "$N" -le 999 ]] || die "DEMO_MESSAGES must be 1..999, not '$N'"
[[ "$RATE" =~ ^[0-9]+$ ]] || die "DEMO_RATE must be a number, not '$RATE'"
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "DEMO_WORKERS must be at least 1, not '$WORKERS'"
need_mxpod_bin # also sets MXPOD_COMM

if [ -t 1 ]; then B1=$'\e[1m' B0=$'\e[0m'; else B1='' B0=''; fi
STEP=0
banner() {
  STEP=$((STEP + 1))
  printf '\n%s==> [%d/%d] %s%s\n' "$B1" "$STEP" "$STEPS" "$*" "$B0"
}

WORK=$(mktemp -d /tmp/backupmx-demo.XXXXXX)
chmod 755 "$WORK"
PRIMARY=$WORK/primary
MX_PID=
DSN_PID=

# ---------------------------------------------------------------- clean-up on any exit
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$? mrc=0
  trap - EXIT INT TERM
  set +e
  printf '\n%s==> cleaning up%s\n' "$B1" "$B0"
  if [ -n "$MX_PID" ] && pid_is "$MX_PID" "$MXPOD_COMM"; then
    log "stopping mx-pod (PID $MX_PID, SIGTERM)"
    stop_pid "$MX_PID" "$MXPOD_COMM" 20 TERM
    wait "$MX_PID" 2> /dev/null || mrc=$?
    log "mx-pod exited with status $mrc"
    if [ "$mrc" != 0 ] && [ "$rc" = 0 ]; then
      warn "mx-pod did not exit 0 on SIGTERM (status $mrc)"
      rc=1
    fi
  fi
  if [ -n "$DSN_PID" ]; then stop_pid "$DSN_PID" smtp-sink 5 TERM; fi
  if [ -d "$PRIMARY/etc" ]; then tests/infra/postfix-primary.sh stop "$PRIMARY" | indent; fi
  if [ "$KEEP" = 1 ]; then log "work dir kept: $WORK"; else rm -rf "$WORK"; log "removed $WORK"; fi
  if [ "$rc" = 0 ]; then log "demo OK"; else log "demo FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; log "interrupted"; exit 130' INT TERM

# every /v1 call needs the admin token (the queue holds addresses)
api() { curl -sS -m 5 -H "Authorization: Bearer $(cat "$WORK/admin-token")" "http://127.0.0.1:$ADMIN/$1"; }
# primary_state: "up", "down" or "?" - what mx-pod's probe thinks of the primary (GET /v1/replay
# lists routes with primary_up; "?" when the answer has no such field)
primary_state() {
  api v1/replay 2> /dev/null | python3 -c '
import json, sys
try:
    r = json.load(sys.stdin)["routes"][0]
    print(("up" if r["primary_up"] else "down") + (" (backing off)" if r.get("backing_off") else ""))
except Exception:
    print("?")' 2> /dev/null || echo '?'
}
# mx_log_tail N: the last N lines of mx-pod's log, shortened to fit a terminal
mx_log_tail() { tail -n "$1" "$WORK/mx-pod.log" | cut -c1-200 | indent; }

# ---------------------------------------------------------------- 1
banner "Starting a Postfix primary for example.test (the domain's own mail server)"
pick_port P_PRIMARY
tests/infra/postfix-primary.sh start "$PRIMARY" "$P_PRIMARY" example.test | indent
swaks --server "127.0.0.1:$P_PRIMARY" --quit-after EHLO --timeout 10 2>&1 | grep -E '^<-' | head -n 3 | indent

# ---------------------------------------------------------------- 2
banner "Writing an mx-pod config and starting mx-pod in front of the primary"
pick_port P_MX
pick_port ADMIN
pick_port P_DSN
# DSNs (bounces, delay warnings) would go to a local smtp-sink; in this demo there must be none
setsid smtp-sink -u nobody -c "127.0.0.1:$P_DSN" 64 > "$WORK/dsn-sink.log" 2>&1 < /dev/null &
DSN_PID=$!
od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$WORK/admin-token"
chmod 600 "$WORK/admin-token"
cat > "$WORK/mx-pod.toml" << EOF
hostname = "mx2.example.test"

[smtp]
listen = ["127.0.0.1:$P_MX"]
max_message_size = 52428800
max_recipients = 100
max_connections = 1000

[queue]
dir = "$WORK/queue"
retention = "5d"
delay_warning = "4h"
max_bytes = "1GiB"

[admin]
listen = "127.0.0.1:$ADMIN"
token_file = "$WORK/admin-token"

[replay]
workers = $WORKERS
auto = true                # probe the primary; deliver only while it answers
rate_per_second = $RATE
max_messages_per_connection = 100
probe_interval = "1s"      # demo: notice the outage and the recovery quickly
min_backoff = "2s"
max_backoff = "10s"

[dsn]
relay = "127.0.0.1:$P_DSN"

[[domains]]
name = "example.test"
primary = "127.0.0.1:$P_PRIMARY"
EOF
log "config $WORK/mx-pod.toml:"
indent < "$WORK/mx-pod.toml"
log "$MXPOD_BIN serve --config $WORK/mx-pod.toml   (log: $WORK/mx-pod.log)"
# (NO_COLOR: plain text log lines in the file)
NO_COLOR=1 setsid "$MXPOD_BIN" serve --config "$WORK/mx-pod.toml" > "$WORK/mx-pod.log" 2>&1 < /dev/null &
MX_PID=$!
t0=$(now)
code=
for ((i = 0; i < 30 * 20; i++)); do
  code=$(curl -s -o /dev/null -m 1 -w '%{http_code}' "http://127.0.0.1:$ADMIN/readyz" || true)
  [ "$code" = 200 ] && break
  alive "$MX_PID" || break
  sleep 0.05
done
if [ "$code" != 200 ]; then
  tail -n 30 "$WORK/mx-pod.log" | indent >&2
  die "mx-pod is not ready (GET /readyz: '$code')"
fi
log "mx-pod PID $MX_PID ready after $(since "$t0")s: SMTP 127.0.0.1:$P_MX, admin http://127.0.0.1:$ADMIN"
swaks --server "127.0.0.1:$P_MX" --quit-after EHLO --timeout 10 2>&1 | grep -E '^<-' | head -n 3 | indent

# ---------------------------------------------------------------- 3
banner "Stopping the primary (simulated outage)"
t_stop=$(now)
tests/infra/postfix-primary.sh stop "$PRIMARY" | indent
if tcp_open "$P_PRIMARY"; then die "the primary still accepts on $P_PRIMARY"; fi
log "127.0.0.1:$P_PRIMARY refuses connections now; waiting for mx-pod's probe to notice (max 15 s)"
state='?'
for ((i = 0; i < 150; i++)); do
  state=$(primary_state)
  case "$state" in down*) break ;; esac
  sleep 0.1
done
log "mx-pod: primary is $state after $(since "$t_stop")s"
mx_log_tail 2

# ---------------------------------------------------------------- 4
banner "Sending $N messages to mx-pod with swaks (the primary is down)"
SENT=0
RUN=$$.$RANDOM
for ((i = 1; i <= N; i++)); do
  num=$(printf '%03d' "$i")
  rcpt="user$(((i - 1) % 3 + 1))@example.test"
  rc=0
  swaks --server "127.0.0.1:$P_MX" --timeout 20 --from alice@sender.test --to "$rcpt" \
    --header "Subject: demo message $num" --header "Message-Id: <demo-$num.$RUN@sender.test>" \
    --body "This is demo message $num of $N." > "$WORK/swaks.out" 2>&1 || rc=$?
  if [ "$i" = 1 ]; then
    log "full SMTP transcript of the first message:"
    indent < "$WORK/swaks.out"
  fi
  reply=$(grep -E '^<- +250 ' "$WORK/swaks.out" | tail -n 1 | sed 's/^<- *//' || true)
  if [ "$rc" = 0 ]; then
    SENT=$((SENT + 1))
    log "demo message $num -> $rcpt: swaks exit 0: $reply"
  else
    problem "demo message $num: swaks exit $rc"
    tail -n 5 "$WORK/swaks.out" | indent
  fi
done
QUEUED=$(api v1/queue | json_get messages || echo '?')
log "sent $SENT of $N; mx-pod says $QUEUED messages are queued"
[ "$SENT" = "$N" ] || problem "only $SENT of $N messages were accepted"
[ "$QUEUED" = "$N" ] || problem "mx-pod queues $QUEUED messages, expected $N"

# ---------------------------------------------------------------- 5
banner "The queue, as the operator sees it (mx-pod queue list)"
log "$MXPOD_BIN queue list --config $WORK/mx-pod.toml"
if ! "$MXPOD_BIN" queue list --config "$WORK/mx-pod.toml" > "$WORK/queue-list.out" 2>&1; then
  problem "mx-pod queue list failed"
fi
indent < "$WORK/queue-list.out"
log "GET /v1/queue:"
api v1/queue | python3 -m json.tool 2> /dev/null | indent || true

# ---------------------------------------------------------------- 6
banner "Starting the primary again (the outage is over)"
tests/infra/postfix-primary.sh start "$PRIMARY" "$P_PRIMARY" example.test | indent

# ---------------------------------------------------------------- 7
banner "Watching mx-pod replay the queue to the primary (GET /v1/queue every second)"
t0=$(now)
left=$QUEUED
for ((s = 0; s <= REPLAY_T; s++)); do
  json=$(api v1/queue 2> /dev/null || true)
  left=$(json_get messages <<< "$json" || echo '?')
  log "t=${s}s  queued: $left of $N   primary: $(primary_state)"
  [ "$left" = 0 ] && break
  sleep 1
done
REPLAY_S=$(since "$t0")
if [ "$left" != 0 ]; then
  problem "the queue is not empty after ${REPLAY_T}s ($left left)"
else
  log "queue empty after ${REPLAY_S}s"
fi
log "last lines of the mx-pod log:"
mx_log_tail 4

# ---------------------------------------------------------------- 8
banner "Checking the primary's maildir: every message exactly once, in arrival order"
MAILDIR=$PRIMARY/mail/inbox
# the primary's virtual(8) writes the maildir files just after it accepted them: give it a moment
for ((i = 0; i < 100; i++)); do
  files=$(find "$MAILDIR/new" "$MAILDIR/cur" -type f 2> /dev/null | wc -l)
  [ "$files" -ge "$N" ] && break
  sleep 0.1
done
sleep 0.5   # a duplicate would arrive right behind the others
log "order source: the primary's maillog, its smtpd 'info: END-OF-MESSAGE' lines (one per message,"
log "in the order the primary committed them), named by the 'info: header Subject:' lines"
SENT_TSV=$WORK/sent.tsv
for ((i = 1; i <= N; i++)); do printf '%03d\tdemo message %03d\tmx-pod\n' "$i" "$i"; done > "$SENT_TSV"
python3 demo/check-delivery.py "$MAILDIR" "$PRIMARY/maillog" "$SENT_TSV" > "$WORK/check.out" 2>&1 || true
sed '$d' "$WORK/check.out" | indent
DELIVERED=0 DUPS=0 ORDER_OK=no IN_LOG=0
if [ "$(tail -n 1 "$WORK/check.out" | cut -d' ' -f1)" = RESULT ]; then
  read -r _ DELIVERED DUPS OOO IN_LOG _ < <(tail -n 1 "$WORK/check.out")
  # every message received once, in the order mx-pod accepted them
  if [ "$OOO" = 0 ] && [ "$DUPS" = 0 ] && [ "$IN_LOG" = "$N" ] && [ "$DELIVERED" = "$N" ]; then ORDER_OK=yes; fi
else
  problem "the maildir/maillog check itself failed (see above)"
fi
[ "$DELIVERED" = "$N" ] || problem "$DELIVERED of $N messages are in the primary's maildir"
[ "$DUPS" = 0 ] || problem "$DUPS duplicate deliveries"
[ "$ORDER_OK" = yes ] || problem "the primary did not receive the messages exactly once in arrival order"
DSNS=$(tr '\r' '\n' < "$WORK/dsn-sink.log" | sed -n 's/.*mesg=\([0-9]*\).*/\1/p' | tail -n 1)
DSNS=${DSNS:-0}
[ "$DSNS" = 0 ] || problem "mx-pod sent $DSNS DSN(s) (bounces or delay warnings)"

# ---------------------------------------------------------------- 9
banner "Summary"
printf '    %-34s %8s %8s  %s\n' "check" "value" "expected" "result"
printf '    %-34s %8s %8s  %s\n' "sent (swaks exit 0)" "$SENT" "$N" "$(ok "$SENT" "$N")"
printf '    %-34s %8s %8s  %s\n' "queued in mx-pod during the outage" "$QUEUED" "$N" "$(ok "$QUEUED" "$N")"
printf '    %-34s %8s %8s  %s\n' "delivered to the primary's maildir" "$DELIVERED" "$N" "$(ok "$DELIVERED" "$N")"
printf '    %-34s %8s %8s  %s\n' "received by the primary (maillog)" "$IN_LOG" "$N" "$(ok "$IN_LOG" "$N")"
printf '    %-34s %8s %8s  %s\n' "duplicates" "$DUPS" 0 "$(ok "$DUPS" 0)"
printf '    %-34s %8s %8s  %s\n' "arrival order kept" "$ORDER_OK" yes "$(ok "$ORDER_OK" yes)"
printf '    %-34s %8s %8s  %s\n' "DSNs sent by mx-pod" "$DSNS" 0 "$(ok "$DSNS" 0)"
printf '    %-34s %8s %8s\n' "replay time (s), rate limit $RATE/s" "$REPLAY_S" "-"
problems_exit
