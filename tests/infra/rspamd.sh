#!/bin/bash
# rspamd.sh - a real rspamd (Debian's 3.4) on 127.0.0.1, free ports, all state under DIR.
#
#   rspamd.sh start  DIR
#   rspamd.sh stop   DIR
#   rspamd.sh status DIR     (exit 0 running, 3 stopped)
#
# Run as root (tests/infra/deps.sh installs rspamd); rspamd runs as _rspamd. `start` waits until
# both workers answer /ping, writes DIR/env and prints it (stdout: only these lines):
#   RSPAMD_URL=http://127.0.0.1:PORT             normal worker: POST /checkv2 (and /symbols)
#   RSPAMD_CONTROLLER_URL=http://127.0.0.1:PORT  controller: /ping /stat /learnspam ...; no
#                                                password from 127.0.0.1 (Debian's secure_ip)
# Optional env: RSPAMD_PORT, RSPAMD_CONTROLLER_PORT (default: free ones; a restart in the same DIR
# reuses the previous ones when free); RSPAMD_DNS=IP:PORT (default 127.0.0.1:1, a dead resolver:
# every DNS check fails fast, nothing leaves the host; point it at a powerdns.sh instance to
# serve e.g. an RBL zone); RSPAMD_SMALL_TLD=1 (an 11-entry public-suffix list instead of ~9600:
# a cold start takes ~5 s instead of ~20 s, but URL detection only knows those TLDs);
# RSPAMD_EXTRA_BIND=IP (the normal worker also listens on IP:PORT, e.g. the real-node tier's
# bridge gateway, where pods reach the host); BACKUPMX_RSPAMD_CACHE (default
# /var/cache/backupmx-rspamd); START_WAIT_S (default 300),
# STOP_WAIT_S (default 15).
#
# The config is Debian's /etc/rspamd with overrides in DIR/etc: no redis (Bayes, ratelimit etc.
# just log that they lack it), fuzzy_check and the proxy worker off, console logging to DIR/log.
# Verdicts depend on the client IP given in the `IP:` header: a plain message from 127.0.0.1 gets
# "no action"; GTUBE always gets "reject" (see README-realparts.md for the curl commands).
#
# Hyperscan cache: the first start on a machine compiles the public-suffix list and rspamd's
# regexps (~15-20 s on 2 cores) into BACKUPMX_RSPAMD_CACHE/rspamd-VERSION-tld0 (tld1 with
# RSPAMD_SMALL_TLD=1: ~5 s cold), shared by all instances and kept across runs; later starts load
# it (~1 s). A cold start holds an exclusive flock on that dir until every class is written (it
# also waits for rspamd's hs_helper, a few s after /ping), so parallel starts never write the
# same files at once: they wait, then start warm.
set -euo pipefail
umask 022
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_TAG=rspamd
# shellcheck source=tests/infra/common.sh
. "$HERE/common.sh"
# shellcheck source=tests/infra/realparts-lib.sh
. "$HERE/realparts-lib.sh"
exec 3>&1 1>&2 # stdout (fd 3) carries only the env lines; messages go to stderr

usage() { usage_exit 3 6; }

CACHE=${BACKUPMX_RSPAMD_CACHE:-/var/cache/backupmx-rspamd}
SMALL_TLD=${RSPAMD_SMALL_TLD:-0}

# write_config NORMAL_PORT CONTROLLER_PORT: DIR/etc/{local.d,override.d}, loaded after Debian's
write_config() {
  local e=$RP_DIR/etc
  rm -rf "$e"
  mkdir -p "$e/local.d" "$e/override.d" "$RP_DIR/db" "$RP_DIR/run" "$RP_DIR/logdir"
  printf 'bind_socket = "127.0.0.1:%s";\ncount = 1;\n' "$1" > "$e/override.d/worker-normal.inc"
  if [[ -n "${RSPAMD_EXTRA_BIND:-}" ]]; then
    [[ "$RSPAMD_EXTRA_BIND" =~ ^[0-9.]+$ ]] || die "RSPAMD_EXTRA_BIND must be an IPv4 address, not '$RSPAMD_EXTRA_BIND'"
    printf 'bind_socket = "%s:%s";\n' "$RSPAMD_EXTRA_BIND" "$1" >> "$e/override.d/worker-normal.inc"
  fi
  printf 'bind_socket = "127.0.0.1:%s";\ncount = 1;\n' "$2" > "$e/override.d/worker-controller.inc"
  printf 'enabled = false;\n' > "$e/override.d/worker-proxy.inc"
  printf 'type = "console";\nlevel = "info";\n' > "$e/override.d/logging.inc"
  # fuzzy_check resolves fuzzy*.rspamd.com through the system resolver at start, ignoring
  # dns.nameserver: keep it off
  printf 'enabled = false;\n' > "$e/override.d/fuzzy_check.conf"
  {
    printf 'dns {\n  nameserver = ["%s"];\n  timeout = 0.2s;\n  retransmits = 1;\n}\n' "$DNS"
    printf 'hs_cache_dir = "%s/";\n' "$HS_DIR"
    if [ "$SMALL_TLD" = 1 ]; then
      printf '%s\n' com net org test example invalid localhost io de uk co.uk > "$e/tld.dat"
      printf 'url_tld = "%s/tld.dat";\n' "$e"
    fi
  } > "$e/local.d/options.inc"
  # LOGDIR must not be DIR/log (our console log file): rspamd.conf names $LOGDIR/rspamd.log
  chown -R _rspamd:_rspamd "$RP_DIR/db" "$RP_DIR/run" "$RP_DIR/logdir"
}

# the cache: shared by all instances, owned by _rspamd. One subdir per rspamd build and TLD list:
# rspamd deletes the files of its cache dir that its own config does not use (an instance with
# the small TLD list would delete the full list's 40 MB database, and the other way round).
prepare_cache() {
  local v
  v=$(rspamd --version 2> /dev/null | sed -n 's/.*version \([0-9][0-9.]*\).*/\1/p' | head -n1)
  HS_DIR=$CACHE/rspamd-${v:-unknown}-tld$SMALL_TLD
  mkdir -p "$HS_DIR"
  chown _rspamd:_rspamd "$CACHE" "$HS_DIR"
  chmod 755 "$CACHE" "$HS_DIR"
  setpriv --reuid=_rspamd --regid=_rspamd --clear-groups test -w "$HS_DIR" ||
    die "$HS_DIR is not writable by _rspamd (set BACKUPMX_RSPAMD_CACHE to another dir)"
  MARKER=$HS_DIR/.complete
}

ping_both() {
  curl -sf -m 5 "http://127.0.0.1:$NPORT/ping" && curl -sf -m 5 "http://127.0.0.1:$CPORT/ping"
}

# launch TRY: one try of cmd_start (rp_start_loop): the ports, the config, rspamd (uses
# cmd_start's want_n and want_c)
launch() {
  rp_pick_port NPORT "" "$want_n" "$(rp_port_of "$(rp_prev RSPAMD_URL)")"
  rp_pick_port CPORT "" "$want_c" "$(rp_port_of "$(rp_prev RSPAMD_CONTROLLER_URL)")"
  write_config "$NPORT" "$CPORT"
  log "starting rspamd: normal 127.0.0.1:$NPORT, controller 127.0.0.1:$CPORT, DNS $DNS (try $1)"
  rp_spawn _rspamd rspamd -f -c /etc/rspamd/rspamd.conf \
    --var=LOCAL_CONFDIR="$RP_DIR/etc" --var=DBDIR="$RP_DIR/db" \
    --var=RUNDIR="$RP_DIR/run" --var=LOGDIR="$RP_DIR/logdir"
}

cmd_start() {
  local t0=$EPOCHREALTIME cold=0 want_n=${RSPAMD_PORT:-} want_c=${RSPAMD_CONTROLLER_PORT:-}
  local wait_s=${START_WAIT_S:-300}
  DNS=${RSPAMD_DNS:-127.0.0.1:1}
  [[ "$DNS" =~ ^[0-9.]+:[0-9]+$ ]] || die "RSPAMD_DNS must be IP:PORT, not '$DNS'"
  rp_prepare rspamd _rspamd
  prepare_cache

  # fd 8: the cache lock. Warm cache: shared (only waits for a cold start in progress).
  # Cold: exclusive, then look again (a start we waited for may have filled it).
  exec 8>> "$HS_DIR/.lock"
  if [ -e "$MARKER" ]; then
    flock -s -w "$wait_s" 8 || die "cache $HS_DIR locked for ${wait_s}s"
  else
    log "hyperscan cache $HS_DIR is cold: waiting for the exclusive lock on it"
    flock -x -w "$wait_s" 8 || die "cache $HS_DIR locked for ${wait_s}s"
    if [ -e "$MARKER" ]; then
      flock -s 8 # another start filled it meanwhile: downgrade
    else
      cold=1
      log "cold start: rspamd compiles its hyperscan databases into $HS_DIR (~15-20 s, once per machine)"
    fi
  fi

  rp_start_loop launch ping_both rspamd "$wait_s" "$want_n$want_c" \
    "a port was taken meanwhile; retrying with other ports" \
    "rspamd in $RP_DIR did not answer /ping within ${wait_s}s"

  if [ "$cold" = 1 ]; then
    # rspamd answers before its hs_helper has compiled (and written) all regexp classes; wait
    # for that too, so that the cache is complete before anyone may stop this instance
    if rp_wait 120 grep -q 'rspamd_rs_compile_cb: compiled' "$RP_LOG"; then
      : > "$MARKER"
      log "hyperscan cache complete after $(since "$t0")s ($(du -sh "$HS_DIR" | cut -f1) in $HS_DIR)"
    else
      warn "rspamd's hs_helper did not report its compile; the cache stays marked cold"
    fi
  fi
  exec 8>&- # release the cache lock

  rp_write_env "RSPAMD_URL=http://127.0.0.1:$NPORT" "RSPAMD_CONTROLLER_URL=http://127.0.0.1:$CPORT"
  log "rspamd up in $(since "$t0")s (PID $(cat "$RP_PIDFILE"), log $RP_LOG, env $RP_ENV)"
  cat "$RP_ENV" >&3
}

[ $# -eq 2 ] || usage
action=$1
need_root
need_cmd rspamd curl setsid setpriv flock ss
rp_layout rspamd "$2"
rp_main "$action" rspamd
