#!/bin/bash
# powerdns.sh - a real PowerDNS authoritative server (Debian's 4.7, gsqlite3 backend, REST API)
# on 127.0.0.1, free ports, all state under DIR.
#
#   powerdns.sh start  DIR
#   powerdns.sh stop   DIR
#   powerdns.sh status DIR     (exit 0 running, 3 stopped)
#
# Run as root (tests/infra/deps.sh installs pdns-server, pdns-backend-sqlite3, sqlite3); the
# server binds its ports, then runs as pdns. No zone exists at the first start: create them
# through the API. `start` waits until the API answers with the key and DNS answers (REFUSED for
# an unknown zone), writes DIR/env and prints it (stdout: only these lines):
#   PDNS_API_URL=http://127.0.0.1:PORT   REST API (header X-API-Key), /api/v1/servers/localhost/...
#   PDNS_API_KEY=...                     random unless given
#   PDNS_SERVER_ID=localhost
#   PDNS_DNS=127.0.0.1:PORT              DNS, UDP and TCP:  dig @127.0.0.1 -p PORT NAME TYPE
# Optional env: PDNS_PORT (DNS), PDNS_API_PORT, PDNS_API_KEY (default: free ports / a random key;
# a restart in the same DIR reuses the previous ports when free, and the previous key);
# START_WAIT_S (default 30), STOP_WAIT_S (default 15).
# The database DIR/pdns.sqlite3 is kept across stop/start in the same DIR (zones survive a
# restart); a fresh DIR starts empty. Caches are off (cache-ttl=0 etc.): every answer reflects
# the database at once, also after a write that bypasses the API.
set -euo pipefail
umask 022
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_TAG=powerdns
# shellcheck source=tests/infra/common.sh
. "$HERE/common.sh"
# shellcheck source=tests/infra/realparts-lib.sh
. "$HERE/realparts-lib.sh"
exec 3>&1 1>&2 # stdout (fd 3) carries only the env lines; messages go to stderr

usage() { usage_exit 4 7; }

SCHEMA=/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql

api_up() {
  curl -sf -m 2 -H "X-API-Key: $KEY" "http://127.0.0.1:$APORT/api/v1/servers/localhost" > /dev/null
}
dns_up() {
  dig @127.0.0.1 -p "$DPORT" +norec +time=1 +tries=1 SOA probe.invalid | grep -q 'status:'
}
both_up() { api_up && dns_up; }

# launch TRY: one try of cmd_start (rp_start_loop): the ports, pdns.conf, pdns_server (uses
# cmd_start's want_d and want_a)
launch() {
  rp_pick_port DPORT udp "$want_d" "$(rp_port_of "$(rp_prev PDNS_DNS)")"
  rp_pick_port APORT "" "$want_a" "$(rp_port_of "$(rp_prev PDNS_API_URL)")"
  cat > "$RP_DIR/pdns.conf" << EOF
# written by tests/infra/powerdns.sh
launch=gsqlite3
gsqlite3-database=$RP_DIR/pdns.sqlite3
local-address=127.0.0.1
local-port=$DPORT
socket-dir=$RP_DIR/run
setuid=pdns
setgid=pdns
daemon=no
guardian=no
disable-syslog=yes
loglevel=4
security-poll-suffix=
primary=no
secondary=no
distributor-threads=1
receiver-threads=1
cache-ttl=0
negquery-cache-ttl=0
query-cache-ttl=0
zone-cache-refresh-interval=0
api=yes
api-key=$KEY
webserver=yes
webserver-address=127.0.0.1
webserver-port=$APORT
webserver-allow-from=127.0.0.0/8
default-soa-content=ns1.@ hostmaster.@ 1 10800 3600 604800 3600
EOF
  chmod 640 "$RP_DIR/pdns.conf"
  chgrp pdns "$RP_DIR/pdns.conf"
  log "starting pdns_server: DNS 127.0.0.1:$DPORT (udp+tcp), API http://127.0.0.1:$APORT (try $1)"
  rp_spawn - pdns_server --config-dir="$RP_DIR"
}

cmd_start() {
  [ -r "$SCHEMA" ] || die "$SCHEMA not found; run tests/infra/deps.sh (pdns-backend-sqlite3)"
  local t0=$EPOCHREALTIME want_d=${PDNS_PORT:-} want_a=${PDNS_API_PORT:-}
  local wait_s=${START_WAIT_S:-30}
  rp_prepare pdns_server pdns
  KEY=${PDNS_API_KEY:-$(rp_prev PDNS_API_KEY)}
  [ -n "$KEY" ] || KEY=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
  [[ "$KEY" =~ ^[A-Za-z0-9._~+/=-]+$ ]] || die "PDNS_API_KEY may hold only [A-Za-z0-9._~+/=-]"

  if [ ! -s "$RP_DIR/pdns.sqlite3" ]; then
    sqlite3 "$RP_DIR/pdns.sqlite3" < "$SCHEMA"
  fi
  mkdir -p "$RP_DIR/run"
  # pdns writes the database (and sqlite's journal next to it) and its control socket
  chown pdns:pdns "$RP_DIR" "$RP_DIR/pdns.sqlite3" "$RP_DIR/run"

  rp_start_loop launch both_up pdns_server "$wait_s" "$want_d$want_a" \
    "a port was taken meanwhile; retrying with other ports" \
    "PowerDNS in $RP_DIR did not answer within ${wait_s}s"

  rp_write_env "PDNS_API_URL=http://127.0.0.1:$APORT" "PDNS_API_KEY=$KEY" "PDNS_SERVER_ID=localhost" \
    "PDNS_DNS=127.0.0.1:$DPORT"
  log "PowerDNS up in $(since "$t0")s (PID $(cat "$RP_PIDFILE"), log $RP_LOG, env $RP_ENV)"
  cat "$RP_ENV" >&3
}

[ $# -eq 2 ] || usage
action=$1
need_root
need_cmd pdns_server sqlite3 curl dig python3 setsid flock ss
rp_layout pdns "$2"
rp_main "$action" pdns_server
