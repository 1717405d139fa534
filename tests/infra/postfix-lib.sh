#!/bin/bash
# postfix-lib.sh - what postfix-primary.sh and postfix-backup.sh share: one self-contained Postfix
# instance per state directory, on 127.0.0.1 only. Source it after common.sh.
#
# Layout of an instance directory DIR (created by pf_prepare):
#   DIR/etc/main.cf, master.cf   configuration (postfix -c DIR/etc ...; root may use any -c dir)
#   DIR/spool/                   queue_directory (its own maildrop, pid/master.pid, public/...)
#   DIR/data/                    data_directory (owner postfix)
#   DIR/maillog                  Postfix's log (maillog_file via postlogd; kept across restarts)
#   DIR/port                     the TCP port of the last start
#   DIR/postfix.out              output of the last `postfix start`
#
# Multi-instance notes (why it looks like this):
# - Each instance has its own queue_directory and data_directory, so its own master.pid lock,
#   maildrop (pickup), public/private sockets and postlogd: instances never see each other.
# - master.cf is written from scratch: only "127.0.0.1:PORT inet smtpd" listens on TCP, plus the
#   internal unix services; nothing is chrooted (Debian's master.cf chroots into the queue dir,
#   which would need copies of /etc files there).
# - `postfix -c DIR start` daemonizes the master (it stays root and does setsid, so it leads its
#   own process group; children run as postfix). We stop it by the PID in its own PID file and
#   then wait for the whole group: smtpd children keep the inherited listening socket open for a
#   moment after the master is gone.
# - maillog_file must lie under maillog_file_prefixes, set to DIR.

# pf_layout DIR: set the PF_* path variables for the instance in DIR (made absolute)
pf_layout() {
  PF_DIR=$(realpath -m "$1")
  PF_ETC=$PF_DIR/etc
  PF_SPOOL=$PF_DIR/spool
  PF_DATA=$PF_DIR/data
  PF_LOG=$PF_DIR/maillog
  PF_PIDFILE=$PF_SPOOL/pid/master.pid
}

# pf_master_pid: print the master's PID when the instance runs (PID file + comm check)
pf_master_pid() {
  local pid
  [ -s "$PF_PIDFILE" ] || return 1
  pid=$(tr -dc '0-9' < "$PF_PIDFILE")
  pid_is "$pid" master || return 1
  echo "$pid"
}

# pf_prepare NAME MYHOSTNAME PORT: create the directories, master.cf, and a fresh main.cf with
# the settings both kinds of instance share. The caller adds its own with pf_conf.
pf_prepare() {
  local name=$1 host=$2 port=$3
  mkdir -p "$PF_DIR"
  make_reachable "$PF_DIR"
  mkdir -p "$PF_ETC" "$PF_SPOOL" "$PF_DATA"
  chown root:root "$PF_SPOOL"
  chown postfix:postfix "$PF_DATA"
  echo "$port" > "$PF_DIR/port"

  # master.cf: TCP listener on 127.0.0.1:PORT only, internal services, no chroot
  cat > "$PF_ETC/master.cf" << EOF
# written by tests/infra ($name): only 127.0.0.1:$port listens on TCP; nothing is chrooted
# service             type  private unpriv  chroot  wakeup  maxproc command
127.0.0.1:$port       inet  n       -       n       -       -       smtpd
pickup                unix  n       -       n       60      1       pickup
cleanup               unix  n       -       n       -       0       cleanup
qmgr                  unix  n       -       n       300     1       qmgr
rewrite               unix  -       -       n       -       -       trivial-rewrite
bounce                unix  -       -       n       -       0       bounce
defer                 unix  -       -       n       -       0       bounce
trace                 unix  -       -       n       -       0       bounce
verify                unix  -       -       n       -       1       verify
flush                 unix  n       -       n       1000?   0       flush
proxymap              unix  -       -       n       -       -       proxymap
proxywrite            unix  -       -       n       -       1       proxymap
smtp                  unix  -       -       n       -       -       smtp
relay                 unix  -       -       n       -       -       smtp
showq                 unix  n       -       n       -       -       showq
error                 unix  -       -       n       -       -       error
retry                 unix  -       -       n       -       -       error
discard               unix  -       -       n       -       -       discard
local                 unix  -       n       n       -       -       local
virtual               unix  -       n       n       -       -       virtual
anvil                 unix  -       -       n       -       1       anvil
tlsmgr                unix  -       -       n       1000?   1       tlsmgr
scache                unix  -       -       n       -       1       scache
postlog               unix-dgram n  -       n       -       1       postlogd
EOF

  # main.cf from scratch (so a restart never inherits a stale setting)
  : > "$PF_ETC/main.cf"
  pf_conf compatibility_level=3.6 \
    queue_directory="$PF_SPOOL" data_directory="$PF_DATA" \
    maillog_file_prefixes="$PF_DIR" maillog_file="$PF_LOG" syslog_name="$name" \
    myhostname="$host" mydomain=example.test myorigin=example.test \
    inet_interfaces=127.0.0.1 inet_protocols=ipv4 mynetworks=127.0.0.1/32 \
    smtpd_peername_lookup=no biff=no \
    mydestination= local_recipient_maps= alias_maps= alias_database= \
    smtpd_tls_security_level=none smtp_tls_security_level=none \
    enable_long_queue_ids=yes \
    'default_transport=error:outbound mail disabled' \
    'relay_transport=error:outbound mail disabled'
}

# pf_conf NAME=VALUE...: set main.cf parameters of this instance
pf_conf() {
  postconf -c "$PF_ETC" -e "$@"
  pf_settle
}

# pf_settle: backdate the files in DIR/etc by a minute. Postfix programs that load main.cf or a
# texthash map whose mtime is less than ~2 s old take it for a file being edited and re-read it
# every 300 ms until it is older: `postfix start` (and every new daemon) would wait ~2 s after
# each edit. Our files are complete when written, so they may look older.
pf_settle() {
  touch -d "@$((EPOCHSECONDS - 60))" "$PF_ETC"/*
}

# pf_start PORT WAIT_S: start the master and wait until 127.0.0.1:PORT accepts connections.
# On failure print the tail of the logs and exit non-zero.
pf_start() {
  local port=$1 wait_s=${2:-30} pid
  if pid=$(pf_master_pid); then die "Postfix in $PF_DIR already runs (master PID $pid); stop it first"; fi
  tcp_open "$port" && die "127.0.0.1:$port is already in use by another program"
  pf_settle
  # (postfix start runs Postfix's own configuration checks first; a separate
  # `postfix check` would cost another ~1-2 s of postconf calls)
  if ! postfix -c "$PF_ETC" start > "$PF_DIR/postfix.out" 2>&1; then
    cat "$PF_DIR/postfix.out" >&2
    tail -n 20 "$PF_LOG" >&2 2> /dev/null || true
    die "postfix -c $PF_ETC start failed"
  fi
  pid=$(pf_master_pid) || true
  if ! wait_tcp "$port" "$wait_s" "$pid"; then
    echo "--- $PF_DIR/postfix.out" >&2; cat "$PF_DIR/postfix.out" >&2 || true
    echo "--- last lines of $PF_LOG" >&2; tail -n 25 "$PF_LOG" >&2 2> /dev/null || true
    die "Postfix in $PF_DIR does not accept on 127.0.0.1:$port after ${wait_s}s"
  fi
  pid=$(pf_master_pid) || die "Postfix master in $PF_DIR vanished after start"
  log "Postfix up: master PID $pid, SMTP 127.0.0.1:$port, config $PF_ETC, log $PF_LOG"
}

# pf_stop WAIT_S: stop the master by its PID file, then wait for its process group to be gone
pf_stop() {
  local wait_s=${1:-15} pid port
  if ! pid=$(pf_master_pid); then
    log "Postfix in $PF_DIR is not running; nothing to stop"
    return 0
  fi
  log "stopping Postfix in $PF_DIR (master PID $pid, SIGTERM, then waiting for its process group)"
  stop_pid "$pid" master "$wait_s" TERM || warn "Postfix in $PF_DIR had to be killed"
  port=$(cat "$PF_DIR/port" 2> /dev/null || true)
  if [ -n "$port" ] && ! wait_tcp_closed "$port" 5; then
    die "127.0.0.1:$port still accepts after Postfix in $PF_DIR stopped (another program?)"
  fi
  log "Postfix in $PF_DIR stopped${port:+ (127.0.0.1:$port refuses now)}"
}

# pf_status: print one line and return 0 if running, 3 if not (LSB convention)
pf_status() {
  local pid port
  port=$(cat "$PF_DIR/port" 2> /dev/null || echo '?')
  if pid=$(pf_master_pid); then
    echo "running: master PID $pid, SMTP 127.0.0.1:$port, config $PF_ETC"
    return 0
  fi
  echo "stopped: $PF_DIR"
  return 3
}

# pf_queue_count: number of messages in the queue: distinct queue file names in the message
# queues (the defer/ and bounce/ directories hold logs, not messages). Counted from the spool,
# fast even with 100k messages. qmgr renames files between active/ and deferred/ all the time;
# counting distinct names keeps a file seen in both directories during a walk from counting
# twice (a walk can still miss a file in flight: while the queue is busy, count twice).
pf_queue_count() {
  local q dirs=()
  for q in maildrop incoming active deferred hold; do
    [ -d "$PF_SPOOL/$q" ] && dirs+=("$PF_SPOOL/$q")
  done
  if [ "${#dirs[@]}" = 0 ]; then echo 0; return 0; fi
  find "${dirs[@]}" -type f -printf '%f\n' 2> /dev/null | sort -u | wc -l
}
