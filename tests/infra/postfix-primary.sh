#!/bin/bash
# postfix-primary.sh - a real Postfix acting as a domain's PRIMARY mail server on 127.0.0.1.
#
#   postfix-primary.sh start  DIR PORT [DOMAIN...]   (default DOMAIN: example.test)
#   postfix-primary.sh stop   DIR
#   postfix-primary.sh status DIR                    (exit 0 running, 3 stopped)
#
# Run as root (tests/infra/deps.sh installs Postfix). All state lives under DIR:
#   DIR/etc (config)  DIR/spool (queue)  DIR/data  DIR/maillog (log)  DIR/mail/inbox/ (maildir)
# Every recipient of every DOMAIN is delivered into the ONE maildir DIR/mail/inbox/ (files in
# new/, owner nobody, mode 600: read them as root), except these fixed recipients, rejected at
# RCPT by DIR/etc/rcpt_access:
#   reject5@DOMAIN    550 5.1.1 No such user here
#   reject4@DOMAIN    450 4.2.0 Try again later
#   reject421@DOMAIN  421 4.3.2 Service shutting down (and the connection is closed)
#   unknown@DOMAIN    550 5.1.1 unknown user
# Message order is observable in DIR/maillog. The commit order (what "arrival order" means for
# a primary) is the order of the "smtpd[...]: QUEUEID: info: END-OF-MESSAGE from ..." lines,
# logged at the end of each message's data, before its 250 (smtpd_end_of_data_restrictions
# INFO). Each QUEUEID also has a "cleanup[...]: QUEUEID: message-id=<...>" line and an
# "info: header Subject: ..." line (header_checks INFO), logged while the headers stream in:
# with several connections at once those follow the header order, not the commit order.
#
# Several instances may run at once (different DIR and PORT). `start` after `stop` on the same
# DIR works and keeps the maildir, the queue and the maillog (a primary outage and recovery).
# DIR may be a `mktemp -d` directory: its mode 700 is changed to 755 (Postfix's unprivileged
# processes and the virtual delivery agent, running as nobody, must reach it).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LOG_TAG=postfix-primary
# shellcheck source=tests/infra/common.sh
. "$HERE/common.sh"
# shellcheck source=tests/infra/postfix-lib.sh
. "$HERE/postfix-lib.sh"

usage() { usage_exit 3 6; }

cmd_start() {
  local port=$1; shift
  local domains=("$@") d vdomains=
  [ "${#domains[@]}" -gt 0 ] || domains=(example.test)
  [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, not '$port'"
  log "preparing a primary for ${domains[*]} in $PF_DIR (port $port)"
  pf_prepare postfix-primary "mx1.${domains[0]}" "$port"

  # the maildir's parent belongs to nobody: virtual(8) creates inbox/{new,cur,tmp} as nobody
  mkdir -p "$PF_DIR/mail"
  chown nobody:nogroup "$PF_DIR/mail"

  # fixed answers at RCPT time (texthash: no postmap needed)
  : > "$PF_ETC/rcpt_access"
  for d in "${domains[@]}"; do
    printf '%s\n' "reject5@$d 550 5.1.1 No such user here" \
      "reject4@$d 450 4.2.0 Try again later" \
      "reject421@$d 421 4.3.2 Service shutting down" \
      "unknown@$d 550 5.1.1 unknown user" >> "$PF_ETC/rcpt_access"
    vdomains="${vdomains:+$vdomains, }$d"
  done
  # log every Subject: lets a person (and a test) follow the arrival order in the maillog
  printf '%s\n' '/^Subject:/ INFO' > "$PF_ETC/header_checks"

  pf_conf virtual_mailbox_domains="$vdomains" \
    virtual_mailbox_base="$PF_DIR/mail" virtual_mailbox_maps=static:inbox/ \
    virtual_uid_maps=static:"$(id -u nobody)" virtual_gid_maps=static:"$(id -g nobody)" \
    smtpd_relay_restrictions=reject_unauth_destination \
    "smtpd_recipient_restrictions=check_recipient_access texthash:$PF_ETC/rcpt_access, reject_unauth_destination" \
    header_checks="regexp:$PF_ETC/header_checks" \
    "smtpd_end_of_data_restrictions=check_client_access static:INFO" \
    message_size_limit=52428800 virtual_mailbox_limit=0
  # (virtual(8) refuses to start when virtual_mailbox_limit < message_size_limit; 0 = no limit)

  log "starting Postfix primary on 127.0.0.1:$port (domains: $vdomains)"
  pf_start "$port" "${START_WAIT_S:-30}"
  log "maildir: $PF_DIR/mail/inbox/   maillog: $PF_LOG"
}

[ $# -ge 2 ] || usage
action=$1 dir=$2
shift 2
need_root
need_cmd postfix postconf setpriv pgrep
pf_layout "$dir"
case "$action" in
  start)
    [ $# -ge 1 ] || usage
    cmd_start "$@" ;;
  stop) pf_stop "${STOP_WAIT_S:-15}" ;;
  status) pf_status ;;
  *) usage ;;
esac
