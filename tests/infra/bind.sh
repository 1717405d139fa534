#!/bin/bash
# bind.sh - a real BIND 9 (Debian's 9.18) on 127.0.0.1, primary for one zone that takes RFC 2136
# dynamic updates signed with a TSIG key (hmac-sha256); free port, all state under DIR.
#
#   bind.sh start  DIR
#   bind.sh stop   DIR
#   bind.sh status DIR     (exit 0 running, 3 stopped)
#
# Run as root (tests/infra/deps.sh installs bind9; nsupdate and dig come with bind9-dnsutils);
# named binds its port, then runs as bind. IPv4 only (named -4, listen-on-v6 none), no rndc
# channel, no recursion, no notify, no transfers. An unsigned update gets REFUSED. `start` waits
# until `dig SOA ZONE` answers, writes DIR/env and prints it (stdout: only these lines):
#   BIND_DNS=127.0.0.1:PORT          DNS, UDP and TCP:  dig @127.0.0.1 -p PORT NAME TYPE
#   DDNS_ZONE=example.test           the zone (no trailing dot)
#   TSIG_KEY_NAME=ddns-key
#   TSIG_ALGORITHM=hmac-sha256
#   TSIG_SECRET=base64...            nsupdate -y "$TSIG_ALGORITHM:$TSIG_KEY_NAME:$TSIG_SECRET"
#   TSIG_KEY_FILE=DIR/tsig.key       nsupdate -k "$TSIG_KEY_FILE" (BIND's key statement)
# Optional env: BIND_PORT, DDNS_ZONE (default example.test), TSIG_KEY_NAME (default ddns-key);
# START_WAIT_S (default 30), STOP_WAIT_S (default 15).
# The zone starts with SOA, NS ns1.ZONE. and ns1.ZONE. A 127.0.0.1. Zone file, journal and key
# are kept across stop/start in the same DIR (updates survive a restart, the key stays the same;
# a restart also reuses the previous port when it is free); a fresh DIR starts from scratch.
set -euo pipefail
umask 022
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_TAG=bind
# shellcheck source=tests/infra/common.sh
. "$HERE/common.sh"
# shellcheck source=tests/infra/realparts-lib.sh
. "$HERE/realparts-lib.sh"
exec 3>&1 1>&2 # stdout (fd 3) carries only the env lines; messages go to stderr

usage() { usage_exit 4 7; }

PORT='' ZONE='' # set by cmd_start
soa_up() {
  dig @127.0.0.1 -p "$PORT" +norec +time=1 +tries=1 SOA "$ZONE" | grep -q 'status: NOERROR'
}

# launch TRY: one try of cmd_start (rp_start_loop): a port, named.conf, named (uses cmd_start's
# want and kf)
launch() {
  rp_pick_port PORT udp "$want" "$(rp_port_of "$(rp_prev BIND_DNS)")"
  cat > "$RP_DIR/named.conf" << EOF
// written by tests/infra/bind.sh
include "$kf";
options {
  directory "$RP_DIR";
  pid-file "$RP_DIR/named.pid";
  session-keyfile "$RP_DIR/session.key";
  managed-keys-directory "$RP_DIR";
  listen-on port $PORT { 127.0.0.1; };
  listen-on-v6 { none; };
  recursion no;
  dnssec-validation no;
  notify no;
  allow-transfer { none; };
};
controls { };
zone "$ZONE" {
  type primary;
  file "$RP_DIR/$ZONE.zone";
  allow-update { key "$KEYNAME"; };
};
EOF
  # named (user bind) writes the journal, pid and session key into DIR and reads the key
  chown -R bind:bind "$RP_DIR"
  chmod 640 "$kf"
  log "starting named: DNS 127.0.0.1:$PORT (udp+tcp), zone $ZONE, TSIG key $KEYNAME (try $1)"
  # -g: foreground, log to stderr; -4: IPv4 only; -u bind: drops to bind after binding
  rp_spawn - named -g -4 -u bind -c "$RP_DIR/named.conf"
}

cmd_start() {
  local t0=$EPOCHREALTIME want=${BIND_PORT:-} secret kf
  local wait_s=${START_WAIT_S:-30}
  ZONE=${DDNS_ZONE:-example.test}
  ZONE=${ZONE%.}
  KEYNAME=${TSIG_KEY_NAME:-ddns-key}
  [[ "$ZONE" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] || die "DDNS_ZONE '$ZONE' is no plain domain name"
  [[ "$KEYNAME" =~ ^[A-Za-z0-9][A-Za-z0-9.-]*$ ]] || die "TSIG_KEY_NAME '$KEYNAME' is no plain name"
  rp_prepare named bind
  kf=$RP_DIR/tsig.key

  # the key: kept when it has the asked-for name (a restart keeps the same secret)
  if ! grep -q "^key \"$KEYNAME\" {" "$kf" 2> /dev/null; then
    tsig-keygen -a hmac-sha256 "$KEYNAME" > "$kf"
  fi
  secret=$(sed -n 's/.*secret "\(.*\)";/\1/p' "$kf")
  [ -n "$secret" ] || die "no secret in $kf"
  # the zone file: kept when present (with its journal, DIR/ZONE.zone.jnl)
  if [ ! -s "$RP_DIR/$ZONE.zone" ]; then
    cat > "$RP_DIR/$ZONE.zone" << EOF
\$TTL 300
@   IN SOA ns1.$ZONE. hostmaster.$ZONE. 1 3600 600 86400 300
@   IN NS  ns1.$ZONE.
ns1 IN A   127.0.0.1
EOF
  fi

  rp_start_loop launch soa_up named "$wait_s" "$want" \
    "the port was taken meanwhile; retrying with another one" \
    "named in $RP_DIR did not answer SOA $ZONE within ${wait_s}s"

  rp_write_env "BIND_DNS=127.0.0.1:$PORT" "DDNS_ZONE=$ZONE" "TSIG_KEY_NAME=$KEYNAME" \
    "TSIG_ALGORITHM=hmac-sha256" "TSIG_SECRET=$secret" "TSIG_KEY_FILE=$kf"
  log "named up in $(since "$t0")s (PID $(cat "$RP_PIDFILE"), log $RP_LOG, env $RP_ENV)"
  cat "$RP_ENV" >&3
}

[ $# -eq 2 ] || usage
action=$1
need_root
need_cmd named tsig-keygen dig setsid flock ss
rp_layout bind "$2"
rp_main "$action" named
