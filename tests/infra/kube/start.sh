#!/bin/bash
# start.sh - start a throw-away Kubernetes v1.20.2 control plane (etcd + kube-apiserver, plus
# kube-controller-manager and kube-scheduler when their binaries exist) on 127.0.0.1, with all
# state under STATEDIR. Build the binaries first: tests/infra/kube/build.sh (or `make deps`).
#
#   start.sh STATEDIR
#
# env (all optional):
#   KUBE_BIN_DIR        dir with kube-apiserver (+ kube-controller-manager, kube-scheduler, kubectl);
#                       default ${BACKUPMX_KUBE_BIN:-$HOME/.cache/backupmx/kube-1.20/bin}
#                       (the default OUTDIR of build.sh)
#   KUBE_API_PORT       apiserver https port   (default 6443, or a free port if taken)
#   KUBE_ETCD_PORT      etcd client port       (default 2379, or a free port if taken)
#   KUBE_ETCD_PEER_PORT etcd peer port         (default 2380, or a free port if taken)
#   KUBE_WITH_KCM       1 = also run kube-controller-manager (needs the binary);
#                       default 1 if $KUBE_BIN_DIR/kube-controller-manager exists, else 0
#   KUBE_KCM_CONTROLLERS  --controllers for it; default
#                       '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route'
#                       (nodelifecycle off: fake Nodes without kubelet heartbeats would go
#                       NotReady after 40s and their pods be marked not Ready/evicted)
#   KUBE_WITH_SCHEDULER 1 = also run kube-scheduler (binds Pods to Ready Nodes, e.g. fake ones a
#                       test creates); default 1 if the binary exists
#   KUBE_DISABLE_ADMISSION  admission plugins to disable; default "ServiceAccount" when no
#                       controller-manager runs (else Pods can't be created: no default SA /
#                       token secret), "" with the controller-manager
#   KUBE_APISERVER_EXTRA_ARGS / KUBE_KCM_EXTRA_ARGS / KUBE_SCHEDULER_EXTRA_ARGS   extra flags
#   KUBE_READY_TIMEOUT  seconds to wait for /readyz (default 120)
#   KUBE_OWNER_PID      PID of the process that owns this cluster (e.g. a Rust test binary:
#                       std::process::id()). When set, a detached watchdog (STATEDIR/watchdog.pid)
#                       polls it every second and, once it is gone (or the PID now belongs to
#                       another process: /proc/PID/stat start time), runs `stop.sh STATEDIR
#                       --purge` (after this start.sh itself has finished).
#
# Writes: STATEDIR/kubeconfig (cluster "local", user "admin" = client cert in system:masters;
# context "token" = static bearer token), STATEDIR/env (source it: KUBECONFIG, KUBE_API_URL,
# KUBE_TOKEN, KUBE_CA, KUBE_API_PORT, KUBE_ETCD_URL, PATH += KUBE_BIN_DIR), STATEDIR/pki/,
# STATEDIR/*.pid, STATEDIR/logs/*.log, STATEDIR/etcd/. Messages go to stderr.
# The processes are setsid-detached and outlive the caller: always run stop.sh STATEDIR (or use
# KUBE_OWNER_PID). Restarting with the same STATEDIR keeps etcd's data and the certificates.
# Needs: openssl, curl, etcd (Debian etcd-server; tests/infra/deps.sh installs them), python3.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATEDIR=${1:?usage: start.sh STATEDIR}
mkdir -p "$STATEDIR"
STATEDIR=$(cd "$STATEDIR" && pwd)
T0=$(date +%s)
log() { printf '[kube-start +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { printf '[kube-start] ERROR: %s\n' "$*" >&2; exit 1; }

# alive PIDFILE: the process is running, i.e. some thread of it is not a zombie (one that exited
# counts as dead at once, before it is reaped: some PID 1s reap orphans seconds later only)
alive() {
  local pid t s
  [ -f "$1" ] && pid=$(cat "$1") && [ -n "$pid" ] || return 1
  for t in /proc/"$pid"/task/*/stat; do
    s=$(sed 's/.*) //' "$t" 2> /dev/null | cut -c1)
    [ -n "$s" ] && [ "$s" != Z ] && return 0
  done
  return 1
}
if alive "$STATEDIR/kube-apiserver.pid" || alive "$STATEDIR/etcd.pid"; then
  die "already running in $STATEDIR (run stop.sh $STATEDIR first)"
fi

# ---- owner (KUBE_OWNER_PID): check it now, the watchdog starts below once STATEDIR exists
# starttime PID: field 22 of /proc/PID/stat (clock ticks after boot); the fields after "(comm) "
# start at field 3, so it is the 20th there (comm may contain spaces and parentheses)
starttime() { { sed 's/.*) //' "/proc/$1/stat" 2> /dev/null || true; } | cut -d' ' -f20; }
OWNER_PID=${KUBE_OWNER_PID:-}
if [ -n "$OWNER_PID" ]; then
  [[ "$OWNER_PID" =~ ^[0-9]+$ ]] || die "KUBE_OWNER_PID must be a PID, not '$OWNER_PID'"
  OWNER_START=$(starttime "$OWNER_PID")
  [ -n "$OWNER_START" ] || die "KUBE_OWNER_PID=$OWNER_PID: no such process"
fi

# ---- binaries
KUBE_BIN_DIR=${KUBE_BIN_DIR:-${BACKUPMX_KUBE_BIN:-${HOME:-/root}/.cache/backupmx/kube-1.20/bin}}
APISERVER=$KUBE_BIN_DIR/kube-apiserver
[ -x "$APISERVER" ] || die "no $APISERVER; build it: bash $HERE/build.sh $KUBE_BIN_DIR (or: make deps)"
KCM=$KUBE_BIN_DIR/kube-controller-manager
if [ -z "${KUBE_WITH_KCM:-}" ]; then [ -x "$KCM" ] && KUBE_WITH_KCM=1 || KUBE_WITH_KCM=0; fi
MISSING=
for t in openssl curl; do command -v $t > /dev/null || MISSING="$MISSING $t"; done
command -v etcd > /dev/null || MISSING="$MISSING etcd-server"
if [ -n "$MISSING" ]; then
  [ "$(id -u)" = 0 ] || die "missing:$MISSING; run tests/infra/deps.sh (as root) first"
  log "apt-get install$MISSING"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends $MISSING > /dev/null ||
    {
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=900 install -y --no-install-recommends $MISSING > /dev/null
    }
fi

# ---- ports
port_free() { ! (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2> /dev/null ||
    {
      local p
      while :; do
        p=$((20000 + RANDOM % 30000))
        port_free $p && { echo $p; return; }
      done
    }
}
pick() { local want=$1; if port_free "$want"; then echo "$want"; else free_port; fi; }
API_PORT=${KUBE_API_PORT:-$(pick 6443)}
ETCD_PORT=${KUBE_ETCD_PORT:-$(pick 2379)}
ETCD_PEER_PORT=${KUBE_ETCD_PEER_PORT:-$(pick 2380)}
while [ "$ETCD_PEER_PORT" = "$ETCD_PORT" ] || [ "$ETCD_PEER_PORT" = "$API_PORT" ]; do ETCD_PEER_PORT=$(free_port); done
KCM_PORT=$(free_port)
SCHED_PORT=$(free_port)
SCHED=$KUBE_BIN_DIR/kube-scheduler
if [ -z "${KUBE_WITH_SCHEDULER:-}" ]; then [ -x "$SCHED" ] && KUBE_WITH_SCHEDULER=1 || KUBE_WITH_SCHEDULER=0; fi

mkdir -p "$STATEDIR/pki" "$STATEDIR/logs" "$STATEDIR/etcd"
chmod 700 "$STATEDIR/etcd"
# fail MSG: show the logs' tails, stop whatever was started (incl. the watchdog), exit 1
fail() {
  printf '[kube-start] ERROR: %s\n' "$*" >&2
  for f in "$STATEDIR"/logs/*.log; do
    echo "--- tail $f" >&2
    tail -n 25 "$f" >&2
  done
  bash "$HERE/stop.sh" "$STATEDIR" >&2 || true
  exit 1
}

# ---- watchdog: cleans up when the owner goes away (before anything is started, so that an
# owner dying during start-up is covered too; it waits for this script to finish first)
if [ -n "$OWNER_PID" ]; then
  if [ -f "$STATEDIR/watchdog.pid" ]; then # a stale one from an earlier start: stop it
    bash "$HERE/stop.sh" "$STATEDIR" --watchdog-only
  fi
  setsid nohup bash "$HERE/watchdog.sh" "$STATEDIR" "$OWNER_PID" "$OWNER_START" "$$" "$(starttime $$)" \
    < /dev/null > /dev/null 2>> "$STATEDIR/logs/watchdog.log" &
  echo $! > "$STATEDIR/watchdog.pid"
  log "watchdog (pid $!) will run stop.sh --purge when pid $OWNER_PID exits"
fi

# ---- PKI (kept across restarts of the same STATEDIR)
PKI=$STATEDIR/pki
if [ ! -f "$PKI/admin.crt" ]; then
  log "generating certificates in $PKI"
  (
    cd "$PKI"
    exec 2>> "$STATEDIR/logs/openssl.log"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=backupmx-kube-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
    # serving cert (leaf, signed by the CA: rustls/webpki rejects a CA used as end-entity)
    cat > server.ext << EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
    openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj "/CN=kube-apiserver"
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 3650 -extfile server.ext
    # admin client cert: O=system:masters => cluster-admin via RBAC
    cat > client.ext << EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=kube-admin"
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out admin.crt -days 3650 -extfile client.ext
    # controller-manager client cert
    openssl req -newkey rsa:2048 -nodes -keyout kcm.key -out kcm.csr -subj "/CN=system:kube-controller-manager"
    openssl x509 -req -in kcm.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out kcm.crt -days 3650 -extfile client.ext
    # scheduler client cert
    openssl req -newkey rsa:2048 -nodes -keyout scheduler.key -out scheduler.csr -subj "/CN=system:kube-scheduler"
    openssl x509 -req -in scheduler.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out scheduler.crt -days 3650 -extfile client.ext
    # service-account token signing key pair
    openssl genrsa -out sa.key 2048
    openssl rsa -in sa.key -pubout -out sa.pub
    # static admin token
    TOKEN=$(openssl rand -hex 24)
    echo "$TOKEN,kube-admin-token,kube-admin-token,system:masters" > tokens.csv
    echo "$TOKEN" > admin.token
    chmod 600 ./*.key tokens.csv admin.token
  ) || fail "openssl failed (see $STATEDIR/logs/openssl.log)"
fi
TOKEN=$(cat "$PKI/admin.token")
b64() { base64 -w0 < "$1"; }

API_URL=https://127.0.0.1:$API_PORT
cat > "$STATEDIR/kubeconfig" << EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $API_URL
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
- name: admin-token
  user:
    token: $TOKEN
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
- name: token
  context: {cluster: local, user: admin-token, namespace: default}
current-context: local
EOF
chmod 600 "$STATEDIR/kubeconfig"
sed -e "s#client-certificate-data: .*#client-certificate-data: $(b64 "$PKI/kcm.crt")#" \
  -e "s#client-key-data: .*#client-key-data: $(b64 "$PKI/kcm.key")#" \
  "$STATEDIR/kubeconfig" > "$STATEDIR/kcm.kubeconfig"
sed -e "s#client-certificate-data: .*#client-certificate-data: $(b64 "$PKI/scheduler.crt")#" \
  -e "s#client-key-data: .*#client-key-data: $(b64 "$PKI/scheduler.key")#" \
  "$STATEDIR/kubeconfig" > "$STATEDIR/scheduler.kubeconfig"
chmod 600 "$STATEDIR/kcm.kubeconfig" "$STATEDIR/scheduler.kubeconfig"

cat > "$STATEDIR/env" << EOF
export KUBECONFIG=$STATEDIR/kubeconfig
export KUBE_API_URL=$API_URL
export KUBE_TOKEN=$TOKEN
export KUBE_CA=$PKI/ca.crt
export KUBE_API_PORT=$API_PORT
export KUBE_ETCD_URL=http://127.0.0.1:$ETCD_PORT
export PATH=$KUBE_BIN_DIR:\$PATH
EOF

# ---- etcd
log "starting etcd on 127.0.0.1:$ETCD_PORT"
setsid etcd --name backupmx --data-dir "$STATEDIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "backupmx=http://127.0.0.1:$ETCD_PEER_PORT" \
  --logger zap --log-level warn --quota-backend-bytes 4294967296 \
  < /dev/null > "$STATEDIR/logs/etcd.log" 2>&1 &
echo $! > "$STATEDIR/etcd.pid"
for i in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$ETCD_PORT/health" 2> /dev/null | grep -q '"health":"true"' && break
  alive "$STATEDIR/etcd.pid" || fail "etcd exited"
  [ "$i" = 100 ] && fail "etcd not healthy after 20s"
  sleep 0.2
done

# ---- kube-apiserver
DISABLE=${KUBE_DISABLE_ADMISSION-$([ "$KUBE_WITH_KCM" = 1 ] && echo "" || echo ServiceAccount)}
log "starting kube-apiserver on $API_URL (disabled admission: ${DISABLE:-none})"
# shellcheck disable=SC2086
setsid "$APISERVER" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --tls-cert-file="$PKI/server.crt" --tls-private-key-file="$PKI/server.key" \
  --client-ca-file="$PKI/ca.crt" --token-auth-file="$PKI/tokens.csv" \
  --authorization-mode=RBAC \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --api-audiences=https://kubernetes.default.svc.cluster.local \
  --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none \
  --allow-privileged=true --profiling=false \
  ${DISABLE:+--disable-admission-plugins=$DISABLE} \
  --cert-dir="$PKI/apiserver-generated" \
  --v=1 ${KUBE_APISERVER_EXTRA_ARGS:-} \
  < /dev/null > "$STATEDIR/logs/kube-apiserver.log" 2>&1 &
echo $! > "$STATEDIR/kube-apiserver.pid"

TIMEOUT=${KUBE_READY_TIMEOUT:-120}
CURL=(curl -sS --cacert "$PKI/ca.crt" -H "Authorization: Bearer $TOKEN" --max-time 5)
for i in $(seq 1 $((TIMEOUT * 4))); do
  if [ "$("${CURL[@]}" "$API_URL/readyz" 2> /dev/null)" = ok ] &&
    "${CURL[@]}" -f -o /dev/null "$API_URL/api/v1/namespaces/default" 2> /dev/null; then break; fi
  alive "$STATEDIR/kube-apiserver.pid" || fail "kube-apiserver exited"
  [ "$i" = $((TIMEOUT * 4)) ] && fail "kube-apiserver not ready after ${TIMEOUT}s"
  sleep 0.25
done
log "kube-apiserver ready ($("${CURL[@]}" "$API_URL/version" | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p'))"

# ---- optional kube-controller-manager
if [ "$KUBE_WITH_KCM" = 1 ]; then
  [ -x "$KCM" ] || fail "no $KCM (bash $HERE/build.sh $KUBE_BIN_DIR kube-controller-manager)"
  log "starting kube-controller-manager (https 127.0.0.1:$KCM_PORT)"
  # shellcheck disable=SC2086
  setsid "$KCM" --kubeconfig="$STATEDIR/kcm.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --port=0 \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --cert-dir="$PKI/kcm-generated" \
    --controllers="${KUBE_KCM_CONTROLLERS:-*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-service,-route}" \
    --v=1 ${KUBE_KCM_EXTRA_ARGS:-} \
    < /dev/null > "$STATEDIR/logs/kube-controller-manager.log" 2>&1 &
  echo $! > "$STATEDIR/kube-controller-manager.pid"
  # wait for the default ServiceAccount (created by the serviceaccount controller)
  for i in $(seq 1 120); do
    "${CURL[@]}" -f -o /dev/null "$API_URL/api/v1/namespaces/default/serviceaccounts/default" 2> /dev/null && break
    alive "$STATEDIR/kube-controller-manager.pid" || fail "kube-controller-manager exited"
    [ "$i" = 120 ] && fail "no default ServiceAccount after 30s"
    sleep 0.25
  done
  log "kube-controller-manager running (default ServiceAccount exists)"
fi

# ---- optional kube-scheduler
if [ "$KUBE_WITH_SCHEDULER" = 1 ]; then
  [ -x "$SCHED" ] || fail "no $SCHED (bash $HERE/build.sh $KUBE_BIN_DIR kube-scheduler)"
  log "starting kube-scheduler (https 127.0.0.1:$SCHED_PORT)"
  # shellcheck disable=SC2086
  setsid "$SCHED" --kubeconfig="$STATEDIR/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --port=0 --leader-elect=false \
    --cert-dir="$PKI/scheduler-generated" --v=1 ${KUBE_SCHEDULER_EXTRA_ARGS:-} \
    < /dev/null > "$STATEDIR/logs/kube-scheduler.log" 2>&1 &
  echo $! > "$STATEDIR/kube-scheduler.pid"
  sleep 1
  alive "$STATEDIR/kube-scheduler.pid" || fail "kube-scheduler exited"
fi

log "ready in $(($(date +%s) - T0))s: export KUBECONFIG=$STATEDIR/kubeconfig   (or: source $STATEDIR/env)"
