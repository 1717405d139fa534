#!/bin/bash
# realparts-check.sh - self-test of rspamd.sh, powerdns.sh and bind.sh: starts each part in its
# own temp dir, checks that it really works, stops it, and checks that nothing of it is left.
#
#   realparts-check.sh [rspamd] [powerdns] [bind] [parallel]    (default: all four)
#
# Run as root after tests/infra/deps.sh. Prints PASS/FAIL lines, the start/stop times, and last
# "N passed, N failed"; exit 1 on any failure. "parallel" starts two rspamd instances at once.
# Everything runs on 127.0.0.1; the temp dirs are removed at the end.
set -uo pipefail # no -e: count failures and go on
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_TAG=realparts-check
# shellcheck source=tests/infra/common.sh
. "$HERE/common.sh"
need_root
need_cmd curl dig nsupdate python3

WHAT=${*:-rspamd powerdns bind parallel}
T=$(mktemp -d)
npass=0 nfail=0
pass() { echo "PASS $*"; npass=$((npass + 1)); }
fail() { echo "FAIL $*"; nfail=$((nfail + 1)); }
check() {
  local what=$1
  shift
  if "$@"; then pass "$what"; else fail "$what"; fi
}
# timed PART CMD DIR: run tests/infra/PART.sh CMD DIR, stdout to DIR.out, print the time
timed() {
  local t0=$EPOCHREALTIME rc
  bash "$HERE/$1.sh" "$2" "$3" > "$3.out" 2> "$3.err"
  rc=$?
  echo "TIME $1 $2: $(since "$t0")s (exit $rc)"
  [ "$rc" = 0 ] || cat "$3.err"
  return "$rc"
}
# gone DIR COMM: no process of DIR's recorded process group is left (zombies awaiting their
# reaper, PID 1, do not count: they are dead)
gone() {
  local pid
  pid=$(cat "$1/last.pid" 2> /dev/null) || return 0
  ! group_alive "$pid"
}
remember_pid() { cp "$1/pid" "$1/last.pid" 2> /dev/null || true; }

GT='XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X'
printf 'From: a@sender.test\r\nTo: b@example.test\r\nSubject: gtube\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <gtube.1@sender.test>\r\n\r\n%s\r\n' "$GT" > "$T/gtube.eml"
printf 'From: Alice <alice@sender.test>\r\nTo: Bob <bob@example.test>\r\nSubject: lunch tomorrow\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <ham.1@sender.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHi Bob,\r\n\r\nare we still on for lunch tomorrow at noon?\r\n\r\nAlice\r\n' > "$T/ham.eml"
action_of() { json_get action < "$1"; }

check_rspamd() { # check_rspamd DIR
  local d=$1
  (
    # shellcheck disable=SC1091
    . "$d/env"
    curl -s -m 30 -H 'IP: 127.0.0.1' --data-binary @"$T/gtube.eml" "$RSPAMD_URL/checkv2" > "$d.gtube"
    curl -s -m 30 -H 'IP: 127.0.0.1' -H 'From: alice@sender.test' -H 'Rcpt: bob@example.test' \
      --data-binary @"$T/ham.eml" "$RSPAMD_URL/checkv2" > "$d.ham"
    curl -s -m 5 "$RSPAMD_CONTROLLER_URL/ping" > "$d.ping"
  )
  check "rspamd $d: GTUBE -> action reject" test "$(action_of "$d.gtube")" = reject
  check "rspamd $d: plain message from 127.0.0.1 -> no action ($(action_of "$d.ham"))" \
    test "$(action_of "$d.ham")" = "no action"
  check "rspamd $d: controller /ping -> pong" grep -q pong "$d.ping"
}

# cycle PART DIR CHECKS: every part gets the same start, checks, stop and leftover checks, so one
# cycle: start tests/infra/PART.sh in DIR, run `CHECKS DIR` when it started, stop it, check that
# no process is left and that a second stop is a no-op
cycle() {
  local part=$1 d=$2 checks=$3
  if timed "$part" start "$d"; then
    pass "$part start: $(tr '\n' ' ' < "$d.out")"
    remember_pid "$d"
    "$checks" "$d"
  else
    fail "$part start"
  fi
  timed "$part" stop "$d"
  check "$part: no process left" gone "$d"
  check "$part: second stop is a no-op (exit 0)" bash "$HERE/$part.sh" stop "$d" 2> /dev/null
}

# api METHOD PATH JSON: the HTTP status of one keyed PowerDNS API call (U, H, J: check_powerdns)
api() { curl -s -o /dev/null -w '%{http_code}' -H "$H" -H "$J" -X "$1" "$U/$2" -d "$3"; }

check_powerdns() { # check_powerdns DIR (sets the globals of DIR/env, U, H, J, DP)
  local D=$1
  # shellcheck disable=SC1091
  . "$D/env"
  U=$PDNS_API_URL/api/v1/servers/$PDNS_SERVER_ID
  H="X-API-Key: $PDNS_API_KEY"
  J='Content-Type: application/json'
  DP=${PDNS_DNS##*:}
  check "pdns API without key -> 401" test "$(curl -s -o /dev/null -w '%{http_code}' "$U/zones")" = 401
  check "pdns API creates zone bl.test. (201)" \
    test "$(api POST zones '{"name":"bl.test.","kind":"Native","nameservers":["ns1.bl.test."]}')" = 201
  check "pdns API adds A+TXT 2.0.0.127.bl.test. (204)" test "$(api PATCH zones/bl.test. '{"rrsets":[
        {"name":"2.0.0.127.bl.test.","type":"A","ttl":300,"changetype":"REPLACE","records":[{"content":"127.0.0.2","disabled":false}]},
        {"name":"2.0.0.127.bl.test.","type":"TXT","ttl":300,"changetype":"REPLACE","records":[{"content":"\"listed by the test\"","disabled":false}]}]}')" = 204
  check "pdns API creates zone example.test. (201)" \
    test "$(api POST zones '{"name":"example.test.","kind":"Native","nameservers":["ns1.example.test."]}')" = 201
  check "pdns API adds MX+TXT(SPF) example.test. (204)" test "$(api PATCH zones/example.test. '{"rrsets":[
        {"name":"example.test.","type":"MX","ttl":300,"changetype":"REPLACE","records":[{"content":"10 mx1.example.test.","disabled":false}]},
        {"name":"example.test.","type":"TXT","ttl":300,"changetype":"REPLACE","records":[{"content":"\"v=spf1 ip4:127.0.0.1 -all\"","disabled":false}]}]}')" = 204
  check "dig A 2.0.0.127.bl.test -> 127.0.0.2" \
    test "$(dig @127.0.0.1 -p "$DP" +short 2.0.0.127.bl.test A)" = 127.0.0.2
  check "dig TXT 2.0.0.127.bl.test" \
    test "$(dig @127.0.0.1 -p "$DP" +short 2.0.0.127.bl.test TXT)" = '"listed by the test"'
  check "dig MX example.test -> 10 mx1.example.test. (UDP)" \
    test "$(dig @127.0.0.1 -p "$DP" +short example.test MX)" = "10 mx1.example.test."
  check "dig +tcp MX example.test -> 10 mx1.example.test. (TCP)" \
    test "$(dig @127.0.0.1 -p "$DP" +tcp +short example.test MX)" = "10 mx1.example.test."
  check "dig TXT example.test -> SPF" \
    test "$(dig @127.0.0.1 -p "$DP" +short example.test TXT)" = '"v=spf1 ip4:127.0.0.1 -all"'
  check "dig A 3.0.0.127.bl.test -> NXDOMAIN (not listed)" \
    sh -c "dig @127.0.0.1 -p $DP 3.0.0.127.bl.test A | grep -q 'status: NXDOMAIN'"
}

check_bind() { # check_bind DIR (sets the globals of DIR/env, BP, rc)
  local D=$1
  # shellcheck disable=SC1091
  . "$D/env"
  BP=${BIND_DNS##*:}
  check "dig SOA $DDNS_ZONE answers" sh -c "dig @127.0.0.1 -p $BP +short SOA $DDNS_ZONE | grep -q ns1"
  # an MX whose target lies in the zone needs the target's address in the zone (named's
  # check-integrity): without it named REFUSES the whole update, key or not
  printf 'server 127.0.0.1 %s\nzone %s\nupdate add %s. 300 IN MX 10 mx1.%s.\nsend\n' \
    "$BP" "$DDNS_ZONE" "$DDNS_ZONE" "$DDNS_ZONE" > "$T/upd0"
  nsupdate -t 5 -k "$TSIG_KEY_FILE" "$T/upd0" > "$T/upd0.out" 2>&1
  rc=$?
  check "signed MX to an in-zone name without A -> REFUSED (check-integrity; exit $rc)" \
    sh -c "[ $rc = 2 ] && grep -q REFUSED '$T/upd0.out'"
  printf 'server 127.0.0.1 %s\nzone %s\nupdate add mx1.%s. 300 IN A 127.0.0.1\nupdate add %s. 300 IN MX 10 mx1.%s.\nsend\n' \
    "$BP" "$DDNS_ZONE" "$DDNS_ZONE" "$DDNS_ZONE" "$DDNS_ZONE" > "$T/upd"
  check "nsupdate -k TSIG_KEY_FILE adds A mx1 + MX (exit 0)" nsupdate -t 5 -k "$TSIG_KEY_FILE" "$T/upd"
  check "dig MX shows it" test "$(dig @127.0.0.1 -p "$BP" +short MX "$DDNS_ZONE")" = "10 mx1.$DDNS_ZONE."
  check "dig +tcp A mx1 shows it" test "$(dig @127.0.0.1 -p "$BP" +tcp +short A "mx1.$DDNS_ZONE")" = 127.0.0.1
  printf 'server 127.0.0.1 %s\nzone %s\nupdate delete %s. MX\nsend\n' "$BP" "$DDNS_ZONE" "$DDNS_ZONE" > "$T/del"
  check "nsupdate -y alg:name:secret deletes it (exit 0)" \
    nsupdate -t 5 -y "$TSIG_ALGORITHM:$TSIG_KEY_NAME:$TSIG_SECRET" "$T/del"
  check "dig MX shows none" test -z "$(dig @127.0.0.1 -p "$BP" +short MX "$DDNS_ZONE")"
  printf 'server 127.0.0.1 %s\nzone %s\nupdate add evil.%s. 300 IN A 127.0.0.9\nsend\n' \
    "$BP" "$DDNS_ZONE" "$DDNS_ZONE" > "$T/bad"
  nsupdate -t 5 "$T/bad" > "$T/bad.out" 2>&1
  rc=$?
  check "unsigned update -> REFUSED (nsupdate exit $rc: $(tr '\n' ' ' < "$T/bad.out"))" \
    sh -c "[ $rc = 2 ] && grep -q REFUSED '$T/bad.out'"
  check "dig A evil.$DDNS_ZONE shows nothing" test -z "$(dig @127.0.0.1 -p "$BP" +short A "evil.$DDNS_ZONE")"
}

if [[ " $WHAT " == *" rspamd "* ]]; then
  cycle rspamd "$T/rspamd" check_rspamd
fi

if [[ " $WHAT " == *" parallel "* ]]; then
  A=$T/rspamd-a B=$T/rspamd-b
  t0=$EPOCHREALTIME
  timed rspamd start "$A" & pa=$!
  timed rspamd start "$B" & pb=$!
  wait $pa; ra=$?
  wait $pb; rb=$?
  echo "TIME two rspamd starts at once: $(since "$t0")s"
  check "parallel: both rspamd instances started" test "$ra$rb" = 00
  remember_pid "$A"
  remember_pid "$B"
  check "parallel: their four ports differ" \
    test "$(cat "$A/env" "$B/env" | sed 's/.*://' | sort -u | wc -l)" = 4
  check_rspamd "$A"
  check_rspamd "$B"
  timed rspamd stop "$A" & pa=$!
  timed rspamd stop "$B" & pb=$!
  wait $pa $pb
  check "parallel: no process of A left" gone "$A"
  check "parallel: no process of B left" gone "$B"
fi

if [[ " $WHAT " == *" powerdns "* ]]; then
  cycle powerdns "$T/pdns" check_powerdns
fi

if [[ " $WHAT " == *" bind "* ]]; then
  cycle bind "$T/bind" check_bind
fi

rm -rf "$T"
echo "realparts-check: $npass passed, $nfail failed"
[ "$nfail" = 0 ]
