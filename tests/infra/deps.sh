#!/bin/bash
# deps.sh - install (as root, Debian 12) every system package that tests/infra, bench/ and demo/
# use, then build the Kubernetes control plane of the kube test tier (tests/infra/kube/build.sh).
# Idempotent: apt is skipped when all packages are installed already, and the kube build exits at
# once when its binaries exist (the first build takes ~4 minutes: see tests/infra/kube/README.md).
#
#   postfix          postfix, postconf, postqueue, smtp-source, smtp-sink (primary + baseline)
#   swaks            the demo's (and tests') SMTP client
#   libnet-ssleay-perl  swaks --tls (STARTTLS; only a Recommends of swaks, which we skip)
#   curl             mx-pod's admin API
#   bind9-dnsutils   dig (DNS checks in the tests)
#   procps           ps, pgrep -g (process groups), used to stop and measure processes
#   iproute2         ss (free-port checks)
#   python3          JSON parsing of the admin API's answers
#   util-linux       setsid, setpriv, flock;  coreutils: timeout, mktemp  (essential, listed for clarity)
#   etcd-server      etcd, the kube test tier's datastore (tests/infra/kube/start.sh)
#   openssl          the kube test tier's PKI (CA, serving and client certificates)
#   rspamd           a real spam filter to scan test mail with (tests/infra/rspamd.sh)
#   pdns-server      PowerDNS authoritative server with its REST API (tests/infra/powerdns.sh)
#   pdns-backend-sqlite3  its gsqlite3 backend and the schema file we load into a fresh database
#   sqlite3          creates that database from the schema (powerdns.sh)
#   bind9            named and tsig-keygen: RFC 2136 dynamic updates with TSIG (tests/infra/bind.sh)
#                    (nsupdate comes with bind9-dnsutils above)
#   containerd runc containernetworking-plugins   the real node of the node tier
#                    (tests/infra/node/: containerd + runc run the pods, the CNI bridge and
#                    host-local plugins give them IPs on 10.244.0.0/24)
#   iptables conntrack nftables   the kubelet's iptables chains; stop.sh removes them (nft
#                    deletes tables that were empty and absent before)
#   gcc libc6-dev    the pod sandbox ("pause") image, compiled static from tests/infra/node/pause.c
#
# The kube build (kube-apiserver, kube-controller-manager, kube-scheduler v1.20.2 from Debian's
# source package, kubectl from its .deb) installs its own build dependencies (Go 1.19, dpkg-dev,
# two golang-*-dev packages) only when it has something to build. The node build (kubelet,
# kube-proxy, knode-cri: tests/infra/node/build.sh) reuses its source tree and Go cache.
#
# No daemon is started by the install: /usr/sbin/policy-rc.d (exit 101) is created when absent
# (and left in place), and Postfix is preseeded to "No configuration", so it does not even
# write /etc/postfix/main.cf; our scripts run their own instances with postfix -c DIR.
# rspamd, pdns-server and bind9 need no preseeding (no debconf questions); their postinst scripts
# only create the service users (_rspamd, pdns, bind), /etc files and rndc.key, and ask
# invoke-rc.d/deb-systemd-invoke to start the daemon, which policy-rc.d refuses (and there is no
# systemd here). As a guard, stop_packaged_daemons below checks the packages' own PID files after
# an install and stops a system instance that started anyway (only one that this run installed,
# by PID file + /proc/PID/comm, never by name): tests/infra run their own instances on free ports.
set -euo pipefail
LOG_TAG=deps
log() { printf '[%s] %s\n' "$LOG_TAG" "$*"; }
# alive PID (not all of common.sh: it would export LC_ALL=C to apt-get)
# shellcheck source=tests/infra/proc-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/proc-lib.sh"

PKGS=(postfix swaks libnet-ssleay-perl curl bind9-dnsutils procps iproute2 python3 util-linux coreutils etcd-server openssl
  rspamd pdns-server pdns-backend-sqlite3 sqlite3 bind9
  containerd runc containernetworking-plugins iptables conntrack nftables gcc libc6-dev)

[ "$(id -u)" = 0 ] || { echo "[deps] ERROR: run as root (apt-get)" >&2; exit 1; }

# install_packages: apt-get install whatever of PKGS is missing (returns at once when none is)
install_packages() {
  local p missing=()
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2> /dev/null | grep -qx installed || missing+=("$p")
  done
  if [ "${#missing[@]}" = 0 ]; then
    log "all packages present: ${PKGS[*]}"
    return 0
  fi
  log "missing: ${missing[*]}"

  if [ ! -e /usr/sbin/policy-rc.d ]; then
    log "creating /usr/sbin/policy-rc.d (exit 101): package scripts start no daemon"
    printf '#!/bin/sh\n# no daemon starts from package scripts (backupmx tests/infra/deps.sh)\nexit 101\n' \
      > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
  fi

  export DEBIAN_FRONTEND=noninteractive
  if command -v debconf-set-selections > /dev/null; then
    log "preseeding debconf: postfix postfix/main_mailer_type select No configuration"
    echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
  fi

  log "apt-get update"
  apt-get update -q
  log "apt-get install -y --no-install-recommends ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}"

  # check the result rather than trusting apt's exit code alone
  for p in "${missing[@]}"; do
    dpkg-query -W -f='${db:Status-Status}' "$p" 2> /dev/null | grep -qx installed ||
      { echo "[deps] ERROR: $p is still not installed" >&2; exit 1; }
  done
  log "installed: ${missing[*]}"
  stop_packaged_daemons "${missing[@]}"
}

# stop_packaged_daemons PKG...: for each just-installed package that ships a daemon, if its
# system-wide instance is running anyway (policy-rc.d missing or ignored), stop it by the PID
# file the package's own configuration uses, after checking /proc/PID/comm (a reused PID is never
# signalled). A daemon that was running before this run is left alone: its package was not in
# "missing". Prints what it finds either way.
stop_packaged_daemons() {
  local p pf comm pid i
  for p in "$@"; do
    case "$p" in
      rspamd) pf=/run/rspamd/rspamd.pid comm=rspamd ;;
      pdns-server) pf=/run/pdns/pdns.pid comm=pdns_server ;;
      bind9) pf=/run/named/named.pid comm=named ;;
      postfix) pf=/var/spool/postfix/pid/master.pid comm=master ;;
      *) continue ;;
    esac
    pid=
    [ -n "$pf" ] && [ -s "$pf" ] && pid=$(tr -dc '0-9' < "$pf")
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2> /dev/null)" = "$comm" ]; then
      log "$p's postinst left $comm running (PID $pid from $pf); stopping it"
      kill -TERM "$pid" 2> /dev/null || true
      for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
      if alive "$pid"; then kill -KILL "$pid" 2> /dev/null || true; fi
    else
      log "$p: no system $comm instance running (as expected)"
    fi
  done
  return 0
}

install_packages

# the chart tests' tools: helm, kubernetes-validate (tests/infra/helm/install.sh), promtool and the
# Argo CD / Flux / Prometheus Operator models (install-checkers.sh), all under
# ${BACKUPMX_HELM_BIN:-$HOME/.cache/backupmx/helm/bin}; idempotent (a second run takes ~1-5 s)
log "chart tools: tests/infra/helm/install.sh, install-checkers.sh"
bash "$(dirname "$0")/helm/install.sh"
bash "$(dirname "$0")/helm/install-checkers.sh"

# the kube test tier's control plane (idempotent: returns at once when the binaries exist;
# output dir ${BACKUPMX_KUBE_BIN:-$HOME/.cache/backupmx/kube-1.20/bin})
log "kube control plane: tests/infra/kube/build.sh"
bash "$(dirname "$0")/kube/build.sh"

# the node tier's kubelet, kube-proxy and knode-cri, into the same directory (idempotent; reuses
# the control plane's build dir ~/.cache/backupmx/kube-1.20/bin/.build)
log "kube node: tests/infra/node/build.sh"
bash "$(dirname "$0")/node/build.sh"
