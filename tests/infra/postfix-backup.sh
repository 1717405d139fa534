#!/bin/bash
# postfix-backup.sh - a real Postfix configured as a BACKUP MX, the baseline mx-pod is measured
# against. It accepts mail for DOMAIN, queues it, and relays it to the primary at
# RELAY_HOST:RELAY_PORT - but starts HOLDING delivery (defer_transports=smtp), so that the queue
# fills up and `flush` can measure how fast Postfix empties it.
#
#   postfix-backup.sh start   DIR PORT RELAY_HOST:RELAY_PORT [DOMAIN]   (default example.test)
#   postfix-backup.sh stop    DIR
#   postfix-backup.sh status  DIR          (exit 0 running, 3 stopped)
#   postfix-backup.sh release DIR          remove the hold (defer_transports=) and reload
#   postfix-backup.sh flush   DIR          release (if still held), then postqueue -f
#   postfix-backup.sh count   DIR          print the number of queued messages
#
# Run as root. State under DIR: DIR/etc, DIR/spool (queue, on the same disk as DIR), DIR/data,
# DIR/maillog. Each `start` writes main.cf anew, so it always starts holding again.
#
# Tuning, as an admin of a high-throughput backup MX would do it (Postfix's own durability,
# i.e. cleanup's fsync of every queue file before "250 Ok", is left exactly as it is):
#   default_process_limit=100                 up to 100 smtpd (and smtp) processes
#   nothing chrooted                          (master.cf written by postfix-lib.sh)
#   smtp_destination_concurrency_limit=$CONCURRENCY  (env, default 8: the same concurrency the
#   initial_destination_concurrency=$CONCURRENCY       bench gives mx-pod's replay workers)
#   in_flow_delay=0s                          never slow down senders when qmgr lags behind
#   smtpd_peername_lookup=no, no TLS, no DNS   nothing waits on the network
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_TAG=postfix-backup
# shellcheck source=tests/infra/common.sh
. "$HERE/common.sh"
# shellcheck source=tests/infra/postfix-lib.sh
. "$HERE/postfix-lib.sh"

usage() { usage_exit 6 12; }

cmd_start() {
  local port=$1 relay=$2 domain=${3:-example.test} conc=${CONCURRENCY:-8}
  local rhost=${relay%:*} rport=${relay##*:}
  [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, not '$port'"
  [[ "$rport" =~ ^[0-9]+$ && -n "$rhost" && "$relay" == *:* ]] ||
    die "RELAY must be HOST:PORT, not '$relay'"
  [[ "$conc" =~ ^[1-9][0-9]*$ ]] || die "CONCURRENCY must be a positive number, not '$conc'"
  log "preparing a backup MX for $domain in $PF_DIR (port $port, relays to [$rhost]:$rport, concurrency $conc, holding)"
  pf_prepare postfix-backup "mx2.$domain" "$port"

  # everything for DOMAIN goes to the primary by IP literal (no MX/DNS lookup)
  printf '%s smtp:[%s]:%s\n' "$domain" "$rhost" "$rport" > "$PF_ETC/transport"

  pf_conf relay_domains="$domain" relay_recipient_maps= \
    transport_maps="texthash:$PF_ETC/transport" \
    smtpd_relay_restrictions=reject_unauth_destination \
    smtpd_recipient_restrictions=reject_unauth_destination \
    defer_transports=smtp \
    default_process_limit=100 \
    smtp_destination_concurrency_limit="$conc" initial_destination_concurrency="$conc" \
    in_flow_delay=0s \
    message_size_limit=52428800 smtpd_recipient_limit=100 \
    smtp_dns_support_level=disabled

  log "starting Postfix backup MX on 127.0.0.1:$port"
  pf_start "$port" "${START_WAIT_S:-30}"
}

# qmgr_pid: PID of this instance's queue manager (a child of our master, found in its process
# group; only looked at, never signalled)
qmgr_pid() {
  local m p
  m=$(pf_master_pid) || return 1
  for p in $(pgrep -g "$m" 2> /dev/null); do
    [ "$(cat /proc/"$p"/comm 2> /dev/null)" = qmgr ] && { echo "$p"; return 0; }
  done
  return 1
}

cmd_release() {
  local old new i
  pf_master_pid > /dev/null || die "Postfix in $PF_DIR is not running"
  if [ -z "$(postconf -c "$PF_ETC" -h defer_transports)" ]; then
    log "delivery is not held (defer_transports is empty)"
    return 0
  fi
  old=$(qmgr_pid || true)
  log "releasing the hold: postconf defer_transports= ; postfix reload"
  pf_conf defer_transports=
  postfix -c "$PF_ETC" reload 2>&1 | sed "s/^/[$LOG_TAG] /"
  # a reload makes qmgr exit and the master start a new one that has read the new main.cf;
  # flushing before that would let the old qmgr defer everything again
  for ((i = 0; i < 200; i++)); do
    new=$(qmgr_pid || true)
    [ -n "$new" ] && [ "$new" != "$old" ] && { log "new qmgr PID $new runs without the hold"; return 0; }
    sleep 0.05
  done
  die "no new qmgr 10 s after postfix reload (see $PF_LOG)"
}

cmd_flush() {
  cmd_release
  log "postqueue -c $PF_ETC -f (deliver the whole queue now)"
  postqueue -c "$PF_ETC" -f
}

[ $# -ge 2 ] || usage
action=$1 dir=$2
shift 2
need_root
need_cmd postfix postconf postqueue setpriv pgrep
pf_layout "$dir"
case "$action" in
  start)
    [ $# -ge 2 ] || usage
    cmd_start "$@" ;;
  stop) pf_stop "${STOP_WAIT_S:-15}" ;;
  status) pf_status ;;
  release) cmd_release ;;
  flush) cmd_flush ;;
  count) pf_queue_count ;;
  *) usage ;;
esac
