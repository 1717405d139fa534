#!/bin/bash
# demo/cluster.sh - `make demo-cluster`: the backupmx OPERATOR through an outage of the primary,
# on a real single-node Kubernetes on this machine. Meant to be watched: every step is announced
# with a banner and shows the real output of the tools.
#
#   1 build the mx-pod image (tests/infra/node/mx-pod-image.sh) and the operator (cargo --release)
#   2 start a control plane (tests/infra/kube/start.sh) and a real node: kubelet, containerd,
#     runc, CNI bridge (tests/infra/node/start.sh); a StorageClass and hostPath PersistentVolumes
#     for the StatefulSet's volume claims
#   3 install the BackupMx CRD and the chart's RBAC (helm template, namespace scope); run the
#     operator OUTSIDE the cluster as a process, with the chart's ServiceAccount token (pods
#     cannot reach the API server here; the operator reaches the pods on their pod IPs)
#   4 start PowerDNS (example.com: MX 10 mail.example.com -> 127.0.0.1) and a Postfix primary for
#     example.com on 127.0.0.1 and on the node's bridge address 10.244.0.1 (where pods reach it)
#   5 apply a BackupMx (2 replicas, DNS through PowerDNS): pods; the demo plays the cloud
#     controller and gives the SMTP Service a load-balancer address (10.244.0.240, routed to the
#     pods by kube-proxy); the operator publishes it: kubectl get bmx, dig MX
#   6 stop the primary (the outage); the operator holds replay: reason PrimaryDown
#   7 send DEMO_MESSAGES numbered messages through a sending Postfix that tries the primary first
#     and falls back to the backup (smtp_fallback_relay), then DEMO_LOAD more with smtp-source
#     through the load balancer's address; the queue grows in kubectl get bmx
#   8 start the primary again; the operator ramps replay up; watch the queue drain
#   9 check the primary's maildir: every message exactly once, in arrival order per pod
#  10 summary table; everything is stopped and the host restored on exit (also on error/Ctrl-C)
#
# Environment (defaults): DEMO_MESSAGES (20), DEMO_LOAD (60: smtp-source messages through the
# load balancer, counted, not numbered), DEMO_RATE (2: replay messages/s per pod, so the
# ramp can be watched), DEMO_MAX_WORKERS (3), DEMO_RAMP_UP (10s), DEMO_REPLICAS (2),
# DEMO_SEND (postfix: through a sending Postfix with smtp_fallback_relay; swaks: straight to the
# pods), DEMO_REPLAY_TIMEOUT (180 s), DEMO_BUILD_TIMEOUT (2400 s), DEMO_KEEP (0; 1 keeps the work
# dir's logs), DEMO_SENDER_DSN (1; 0: the sending Postfix sends no DSN parameters, NOTIFY/ORCPT),
# OPERATOR_BIN (target/release/backupmx-operator, built here unless set).
# Run as root after `make deps`. Network: loopback and the node's bridge 10.244.0.0/24 only.
# One real node per machine: refuses to start when another one runs (bridge knode0, kubelet).
# Exit status 0 only when every message arrived exactly once and in order.
# shellcheck disable=SC2317  # the predicates below are called through wait_for and the traps
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
LOG_TAG=demo-cluster
# shellcheck source=tests/infra/common.sh
. "$ROOT/tests/infra/common.sh"
# shellcheck source=tests/infra/postfix-lib.sh
. "$ROOT/tests/infra/postfix-lib.sh"
# shellcheck source=demo/demo-lib.sh
. "$ROOT/demo/demo-lib.sh"

N=${DEMO_MESSAGES:-20}
LOAD=${DEMO_LOAD:-60}
RATE=${DEMO_RATE:-2}
MAXW=${DEMO_MAX_WORKERS:-3}
RAMP=${DEMO_RAMP_UP:-10s}
REPLICAS=${DEMO_REPLICAS:-2}
SEND_MODE=${DEMO_SEND:-postfix}
SENDER_DSN=${DEMO_SENDER_DSN:-1}
REPLAY_T=${DEMO_REPLAY_TIMEOUT:-180}
BUILD_T=${DEMO_BUILD_TIMEOUT:-2400}
KEEP=${DEMO_KEEP:-0}
KUBE_BIN=${KUBE_BIN_DIR:-${BACKUPMX_KUBE_BIN:-$HOME/.cache/backupmx/kube-1.20/bin}}
HELM=${HELM:-$HOME/.cache/backupmx/helm/bin/helm}
NS=bmx-demo
BMX=example
DOMAIN=example.com
SC=backupmx-local
POD_UID=65532
STEPS=10

need_root
need_cmd postfix postconf swaks curl dig python3 setsid setpriv pgrep ss ip etcd containerd \
  cargo timeout
[[ "$N" =~ ^[1-9][0-9]*$ && "$N" -le 999 ]] || die "DEMO_MESSAGES must be 1..999, not '$N'"
[[ "$RATE" =~ ^[0-9]+$ ]] || die "DEMO_RATE must be a number, not '$RATE'"
[[ "$MAXW" =~ ^[1-9][0-9]*$ ]] || die "DEMO_MAX_WORKERS must be at least 1, not '$MAXW'"
[[ "$RAMP" =~ ^[0-9]+(s|m)$ ]] || die "DEMO_RAMP_UP must look like 10s or 1m, not '$RAMP'"
[[ "$REPLICAS" =~ ^[1-9]$ ]] || die "DEMO_REPLICAS must be 1..9, not '$REPLICAS'"
[[ "$REPLAY_T" =~ ^[1-9][0-9]*$ ]] || die "DEMO_REPLAY_TIMEOUT must be a number of seconds"
[[ "$BUILD_T" =~ ^[1-9][0-9]*$ ]] || die "DEMO_BUILD_TIMEOUT must be a number of seconds"
case "$SEND_MODE" in postfix | swaks) ;; *) die "DEMO_SEND must be postfix or swaks, not '$SEND_MODE'" ;; esac
case "$SENDER_DSN" in 0 | 1) ;; *) die "DEMO_SENDER_DSN must be 0 or 1, not '$SENDER_DSN'" ;; esac
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet knode-cri; do
  [ -x "$KUBE_BIN/$b" ] || die "$KUBE_BIN/$b is missing: run \`make deps\` first"
done
KUBECTL=$KUBE_BIN/kubectl

if [ -t 1 ]; then B1=$'\e[1m' B0=$'\e[0m'; else B1='' B0=''; fi
STEP=0
T_RUN=$(now)
banner() {
  STEP=$((STEP + 1))
  printf '\n%s==> [%d/%d] %s%s   (t=%ss)\n' "$B1" "$STEP" "$STEPS" "$*" "$B0" "$(since "$T_RUN" | cut -d. -f1)"
}
cmdline() { printf '    %s$ %s%s\n' "$B1" "$*" "$B0"; }

# ---------------------------------------------------------------- refuse a second node
# (one real node per machine: fixed bridge, kubelet ports, host-wide clean-up)
if ip link show knode0 > /dev/null 2>&1; then
  die "a node already runs on this machine (bridge knode0 exists; make node-test?); wait until it is gone"
fi
if pgrep -x kubelet > /dev/null; then
  die "a kubelet already runs on this machine (PID $(pgrep -x kubelet | head -n 1)); wait until it is gone"
fi

WORK=$(mktemp -d /tmp/backupmx-demo-cluster.XXXXXX)
chmod 755 "$WORK"
KSTATE=$WORK/kube
NSTATE=$WORK/node
PRIMARY=$WORK/primary
SENDER=$WORK/sender
PDNS=$WORK/pdns
BUILD_PID=
OP_PID=
OP_COMM=
NODE_STARTED=0
KUBE_STARTED=0
export KUBECONFIG=$KSTATE/kubeconfig

# ---------------------------------------------------------------- clean-up on any exit
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local rc=$? orc=0
  trap - EXIT
  trap '' INT TERM # a second Ctrl-C must not leave a node behind: this takes ~10-20 s
  set +e
  printf '\n%s==> cleaning up%s\n' "$B1" "$B0"
  if [ -n "$BUILD_PID" ] && alive "$BUILD_PID"; then
    log "stopping the build (process group $BUILD_PID)"
    kill -TERM -- "-$BUILD_PID" 2> /dev/null
    wait "$BUILD_PID" 2> /dev/null
  fi
  if [ -n "$OP_PID" ] && pid_is "$OP_PID" "$OP_COMM"; then
    log "stopping the operator (PID $OP_PID, SIGTERM)"
    stop_pid "$OP_PID" "$OP_COMM" 20 TERM
    wait "$OP_PID" 2> /dev/null || orc=$?
    log "operator exited with status $orc"
  fi
  if [ -d "$SENDER/etc" ]; then
    (pf_layout "$SENDER" && pf_stop 15) 2>&1 | indent
  fi
  if [ -d "$PRIMARY/etc" ]; then tests/infra/postfix-primary.sh stop "$PRIMARY" 2>&1 | indent; fi
  if [ -d "$PDNS" ]; then tests/infra/powerdns.sh stop "$PDNS" 2>&1 | indent; fi
  if [ "$NODE_STARTED" = 1 ]; then
    log "stopping the node and restoring the host (tests/infra/node/stop.sh --purge)"
    timeout 120 bash tests/infra/node/stop.sh "$NSTATE" --purge 2>&1 | tail -n 3 | indent
  fi
  if [ "$KUBE_STARTED" = 1 ]; then
    log "stopping the control plane (tests/infra/kube/stop.sh --purge)"
    timeout 60 bash tests/infra/kube/stop.sh "$KSTATE" --purge 2>&1 | tail -n 3 | indent
  fi
  if ip link show knode0 > /dev/null 2>&1; then
    warn "the bridge knode0 is still there"
    [ "$rc" = 0 ] && rc=1
  elif [ "$NODE_STARTED" = 1 ]; then
    log "host restored: no bridge knode0, no kubelet"
  fi
  if [ "$KEEP" = 1 ]; then
    log "work dir kept (logs): $WORK"
  else
    rm -rf "$WORK"
    log "removed $WORK"
  fi
  log "total run time $(since "$T_RUN")s"
  if [ "$rc" = 0 ]; then log "demo OK"; else log "demo FAILED (exit $rc)"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; log "interrupted"; exit 130' INT TERM

# run_long LABEL LOG OUT CMD...: run CMD (its own process group; stdout to OUT, stderr to LOG),
# printing every 10 s how long it has run and its last log line; bounded by DEMO_BUILD_TIMEOUT
run_long() {
  local label=$1 logf=$2 out=$3 t0 i rc=0 last
  shift 3
  t0=$(now)
  setsid "$@" > "$out" 2> "$logf" < /dev/null &
  BUILD_PID=$!
  for ((i = 1; ; i++)); do
    alive "$BUILD_PID" || break
    if [ "$i" -gt $((BUILD_T * 2)) ]; then
      kill -TERM -- "-$BUILD_PID" 2> /dev/null || true
      die "$label: still running after ${BUILD_T}s; stopped (DEMO_BUILD_TIMEOUT)"
    fi
    if ((i % 20 == 0)); then
      last=$(tail -n 1 "$logf" 2> /dev/null | tr -d '\r' | sed 's/^ *//' | cut -c1-90)
      log "  $label: still running after $(since "$t0" | cut -d. -f1)s${last:+  ($last)}"
    fi
    sleep 0.5
  done
  wait "$BUILD_PID" || rc=$?
  BUILD_PID=
  if [ "$rc" != 0 ]; then
    tail -n 30 "$logf" | indent >&2
    die "$label failed (exit $rc)"
  fi
  log "$label: done in $(since "$t0")s"
}

# k ARGS: kubectl 1.20 of the demo cluster, every call bounded
k() { timeout 60 "$KUBECTL" --request-timeout=20s "$@"; }
kn() { k -n "$NS" "$@"; }
# jp PATH: a field of the BackupMx (kubectl jsonpath), empty when absent
jp() { kn get "bmx/$BMX" -o "jsonpath=$1" 2> /dev/null || true; }
# cond TYPE: "Status Reason" of a condition of the BackupMx
cond() { jp "{.status.conditions[?(@.type==\"$1\")].status} {.status.conditions[?(@.type==\"$1\")].reason}"; }
show_bmx() {
  cmdline "kubectl -n $NS get bmx"
  kn get bmx 2>&1 | indent || true
}
# wait_for SECONDS WHAT CMD...: poll CMD every second until it succeeds; false after SECONDS
wait_for() {
  local limit=$1 what=$2 i
  shift 2
  for ((i = 0; i < limit; i++)); do
    "$@" && return 0
    sleep 1
  done
  warn "timed out after ${limit}s waiting for $what"
  return 1
}
tcp_open_at() { timeout 3 bash -c "exec 3<> /dev/tcp/$1/$2" 2> /dev/null; }
pod_ip() { kn get pod "$1" -o 'jsonpath={.status.podIP}' 2> /dev/null || true; }
pod_ready() {
  [ "$(kn get pod "$1" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2> /dev/null)" = True ]
}
# admin_get IP PATH: a GET on a pod's admin API, with the BackupMx's admin token (every /v1 call
# needs it: the queue holds senders and recipients), read from its Secret as a user would
admin_token() { kn get secret "$BMX-admin-token" -o 'jsonpath={.data.token}' 2> /dev/null | base64 -d 2> /dev/null; }
admin_get() { curl -sS -m 5 -H "Authorization: Bearer $(admin_token)" "http://$1:8025$2"; }
# pod_queue IP: messages in that pod's queue, read from its admin API
pod_queue() { admin_get "$1" /v1/queue 2> /dev/null | json_get messages 2> /dev/null || echo '?'; }

# ================================================================ 1
banner "Building the mx-pod image and the operator (release builds; no-ops when current)"
log "the mx-pod image: static release build, packed as a docker-archive tarball (no registry)"
cmdline "bash tests/infra/node/mx-pod-image.sh"
run_long "mx-pod image" "$WORK/image-build.log" "$WORK/image.out" bash tests/infra/node/mx-pod-image.sh
IMAGE_TAR=$(sed -n 1p "$WORK/image.out")
IMAGE=$(sed -n 2p "$WORK/image.out")
if [ ! -f "$IMAGE_TAR" ] || [ -z "$IMAGE" ]; then die "mx-pod-image.sh printed no tarball/image"; fi
log "image $IMAGE: $IMAGE_TAR ($(du -h "$IMAGE_TAR" | cut -f1))"
if [ -n "${OPERATOR_BIN:-}" ]; then
  log "operator: OPERATOR_BIN=$OPERATOR_BIN (not built here)"
else
  cmdline "cargo build --release -p backupmx-operator"
  run_long "operator build" "$WORK/operator-build.log" /dev/null cargo build --release -p backupmx-operator
  OPERATOR_BIN=target/release/backupmx-operator
fi
[ -x "$OPERATOR_BIN" ] || die "operator binary $OPERATOR_BIN not found"
OPERATOR_BIN=$(realpath "$OPERATOR_BIN")
OP_COMM=$(basename "$OPERATOR_BIN" | cut -c1-15)

# ================================================================ 2
banner "Starting Kubernetes 1.20 on this machine: control plane, then a real node"
log "control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler on 127.0.0.1"
cmdline "KUBE_APISERVER_EXTRA_ARGS=--kubelet-preferred-address-types=InternalIP tests/infra/kube/start.sh $KSTATE"
KUBE_STARTED=1
t0=$(now)
env -u KUBE_API_PORT -u KUBECONFIG KUBE_BIN_DIR="$KUBE_BIN" KUBE_OWNER_PID=$$ \
  KUBE_WITH_KCM=1 KUBE_WITH_SCHEDULER=1 \
  KUBE_APISERVER_EXTRA_ARGS=--kubelet-preferred-address-types=InternalIP \
  timeout 300 bash tests/infra/kube/start.sh "$KSTATE" 2>&1 | tail -n 4 | indent
[ -f "$KSTATE/env" ] || die "the control plane did not start (see above)"
T_CP=$(since "$t0")
# shellcheck disable=SC1091  # written by tests/infra/kube/start.sh
. "$KSTATE/env" # KUBECONFIG, KUBE_API_URL, KUBE_TOKEN, KUBE_CA; PATH: kubectl 1.20 first
log "control plane ready in ${T_CP}s at $KUBE_API_URL"

log "the node: a bridge knode0 (10.244.0.1/24), containerd + runc, kubelet, kube-proxy; the image imported"
cmdline "KNODE_WITH_PROXY=1 KNODE_IMAGES=$IMAGE_TAR tests/infra/node/start.sh $NSTATE $KSTATE"
NODE_STARTED=1
t0=$(now)
env -u KUBECONFIG KUBE_BIN_DIR="$KUBE_BIN" KNODE_BIN_DIR="$KUBE_BIN" KNODE_OWNER_PID=$$ \
  KNODE_WITH_PROXY=1 KNODE_IMAGES="$IMAGE_TAR" \
  timeout 300 bash tests/infra/node/start.sh "$NSTATE" "$KSTATE" 2>&1 | tail -n 4 | indent
[ -f "$NSTATE/env" ] || die "the node did not start (see above)"
T_NODE=$(since "$t0")
NODE_NAME=$(sed -n 's/^export KNODE_NAME=//p' "$NSTATE/env")
GW=$(sed -n 's/^export KNODE_GATEWAY=//p' "$NSTATE/env")
[ -n "$GW" ] || die "no KNODE_GATEWAY in $NSTATE/env"
LB_IP=$(sed -n 's/^export KNODE_LB_IP=//p' "$NSTATE/env")
[ -n "$LB_IP" ] || die "no KNODE_LB_IP in $NSTATE/env"
log "node $NODE_NAME Ready in ${T_NODE}s; the host is $GW on the pod network"
cmdline "kubectl get nodes -o wide"
k get nodes -o wide 2>&1 | indent || true

log "namespace $NS, StorageClass $SC (no provisioner) and one hostPath PersistentVolume per pod"
k create namespace "$NS" 2>&1 | indent
wait_for 60 "the default ServiceAccount of $NS" kn get serviceaccount default > /dev/null 2>&1 ||
  die "namespace $NS has no default ServiceAccount"
mkdir -p "$NSTATE/volumes"
{
  cat << EOF
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: $SC}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: WaitForFirstConsumer
reclaimPolicy: Retain
EOF
  for ((i = 0; i < REPLICAS; i++)); do
    pv=$NS-queue-$BMX-$i
    dir=$NSTATE/volumes/$pv
    mkdir -p "$dir"
    chown "$POD_UID:$POD_UID" "$dir"
    cat << EOF
---
apiVersion: v1
kind: PersistentVolume
metadata: {name: $pv}
spec:
  capacity: {storage: 128Mi}
  accessModes: [ReadWriteOnce]
  storageClassName: $SC
  persistentVolumeReclaimPolicy: Retain
  volumeMode: Filesystem
  claimRef: {namespace: $NS, name: queue-$BMX-$i}   # the StatefulSet's claim of pod $BMX-$i
  hostPath: {path: $dir, type: Directory}
EOF
  done
} > "$WORK/storage.yaml"
k apply -f "$WORK/storage.yaml" 2>&1 | indent

# ================================================================ 3
banner "Installing the CRD and the chart's RBAC; running the operator outside the cluster"
cmdline "kubectl apply -f crds/backupmx.yaml"
k apply -f crds/backupmx.yaml 2>&1 | indent
k wait --for=condition=Established --timeout=60s crd/backupmxes.backupmx.io 2>&1 | indent
OP_KUBECONFIG=$KUBECONFIG
OP_USER="the admin kubeconfig"
if [ -x "$HELM" ]; then
  SA=demo-backupmx-operator
  log "the chart's ServiceAccount and RBAC, namespace scope (only what the operator needs):"
  cmdline "helm template demo charts/backupmx-operator -n $NS --set watchNamespace=$NS --set leaderElection.enabled=false --set replicaCount=1 --show-only templates/serviceaccount.yaml --show-only templates/rbac.yaml | kubectl apply -f -"
  "$HELM" template demo charts/backupmx-operator --namespace "$NS" --set watchNamespace="$NS" \
    --set leaderElection.enabled=false --set replicaCount=1 \
    --show-only templates/serviceaccount.yaml --show-only templates/rbac.yaml > "$WORK/rbac.yaml"
  k apply -f "$WORK/rbac.yaml" 2>&1 | indent
  # kubectl 1.20 has no `create token`: a TokenRequest through the API (admin token)
  TOKEN_REQ='{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"expirationSeconds":3600}}'
  sa_token() {
    SA_TOKEN=$(curl -sS -m 10 --cacert "$KUBE_CA" -H "Authorization: Bearer $KUBE_TOKEN" \
      -H 'Content-Type: application/json' -X POST -d "$TOKEN_REQ" \
      "$KUBE_API_URL/api/v1/namespaces/$NS/serviceaccounts/$SA/token" 2> /dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["status"]["token"])' 2> /dev/null) &&
      [ -n "$SA_TOKEN" ]
  }
  SA_TOKEN=
  wait_for 30 "a token of ServiceAccount $NS/$SA" sa_token || die "no TokenRequest token for $NS/$SA"
  OP_KUBECONFIG=$WORK/operator.kubeconfig
  (
    umask 077
    cat > "$OP_KUBECONFIG" << EOF
apiVersion: v1
kind: Config
clusters:
- name: demo
  cluster: {server: "$KUBE_API_URL", certificate-authority: "$KUBE_CA"}
users:
- name: $SA
  user: {token: "$SA_TOKEN"}
contexts:
- name: operator
  context: {cluster: demo, user: $SA, namespace: $NS}
current-context: operator
EOF
  )
  OP_USER="ServiceAccount $NS/$SA (TokenRequest, 1 h)"
  cmdline "kubectl auth can-i --list -n $NS --as system:serviceaccount:$NS:$SA | grep backupmx"
  k auth can-i --list -n "$NS" --as "system:serviceaccount:$NS:$SA" 2>&1 | grep -E 'backupmx|Resources' | indent || true
else
  warn "helm not found at $HELM: the operator runs with the admin kubeconfig instead of the chart's RBAC"
fi
pick_port P_OPM
log "the operator runs on the host, as $OP_USER; it reaches the pods' admin APIs on their pod IPs"
log "(--dns-resync 2s: the demo refreshes status every 2 s; the default is 5m for DNS and 30 s for queues)"
OP_ARGS=(run --namespace "$NS" --leader-elect=false --identity demo-operator --mxpod-image "$IMAGE"
  --metrics-addr "127.0.0.1:$P_OPM" --log-format text --dns-resync 2s)
cmdline "backupmx-operator ${OP_ARGS[*]}   (log: $WORK/operator.log)"
KUBECONFIG=$OP_KUBECONFIG RUST_LOG=info NO_COLOR=1 \
  setsid "$OPERATOR_BIN" "${OP_ARGS[@]}" > "$WORK/operator.log" 2>&1 < /dev/null &
OP_PID=$!
op_ready() {
  alive "$OP_PID" || return 2
  [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$P_OPM/readyz")" = 200 ]
}
if ! wait_for 60 "the operator's /readyz" op_ready; then
  tail -n 20 "$WORK/operator.log" | indent >&2
  die "the operator is not ready"
fi
log "operator PID $OP_PID ready (metrics http://127.0.0.1:$P_OPM/metrics)"

# ================================================================ 4
banner "Starting PowerDNS (the zone $DOMAIN) and the Postfix primary mail.$DOMAIN"
cmdline "tests/infra/powerdns.sh start $PDNS"
tests/infra/powerdns.sh start "$PDNS" > "$WORK/pdns.env" 2> "$WORK/pdns-start.log" || {
  cat "$WORK/pdns-start.log" >&2
  die "PowerDNS did not start"
}
printf '    %s\n' "$(tail -n 1 "$WORK/pdns-start.log")"
PDNS_API_URL=$(sed -n 's/^PDNS_API_URL=//p' "$WORK/pdns.env")
PDNS_API_KEY=$(sed -n 's/^PDNS_API_KEY=//p' "$WORK/pdns.env")
PDNS_DNS=$(sed -n 's/^PDNS_DNS=//p' "$WORK/pdns.env")
DNS_PORT=${PDNS_DNS##*:}
pdns_api() { # METHOD PATH [JSON]: the PowerDNS API; prints the HTTP status
  curl -sS -m 10 -o "$WORK/pdns-api.out" -w '%{http_code}' -X "$1" -H "X-API-Key: $PDNS_API_KEY" \
    -H 'Content-Type: application/json' ${3:+-d "$3"} "$PDNS_API_URL/api/v1/servers/localhost$2"
}
code=$(pdns_api POST /zones "{\"name\":\"$DOMAIN.\",\"kind\":\"Native\",\"nameservers\":[\"ns1.$DOMAIN.\"]}")
[ "$code" = 201 ] || die "PowerDNS: create zone $DOMAIN: HTTP $code $(cat "$WORK/pdns-api.out")"
rrset() { # NAME TYPE CONTENT: one REPLACE of an RRset (PowerDNS API JSON)
  printf '{"name":"%s","type":"%s","ttl":300,"changetype":"REPLACE","records":[{"content":"%s","disabled":false}]}' "$@"
}
rrsets="{\"rrsets\":[$(rrset "$DOMAIN." MX "10 mail.$DOMAIN."),$(rrset "mail.$DOMAIN." A 127.0.0.1)]}"
code=$(pdns_api PATCH "/zones/$DOMAIN." "$rrsets")
[ "$code" = 204 ] || die "PowerDNS: set the primary's records: HTTP $code $(cat "$WORK/pdns-api.out")"
log "zone $DOMAIN: MX 10 mail.$DOMAIN, mail.$DOMAIN A 127.0.0.1 (DNS $PDNS_DNS, API $PDNS_API_URL)"
cmdline "dig @127.0.0.1 -p $DNS_PORT $DOMAIN MX +noall +answer"
dig @127.0.0.1 -p "$DNS_PORT" "$DOMAIN" MX +noall +answer +time=2 +tries=2 2>&1 | indent || true

# a port free on 127.0.0.1 and on the bridge address (pick_port's ss check covers all addresses)
pick_port P_PRIMARY
primary_up() {
  tests/infra/postfix-primary.sh start "$PRIMARY" "$P_PRIMARY" "$DOMAIN" 2>&1 | sed '/preparing a primary/d' | indent
  # the pods reach the host on the bridge only: a second smtpd listener there (as tests/src/node.rs)
  postconf -c "$PRIMARY/etc" -Me "$GW:$P_PRIMARY/inet=$GW:$P_PRIMARY inet n - n - - smtpd"
  postfix -c "$PRIMARY/etc" reload > /dev/null 2>&1 || die "postfix reload of the primary failed"
  wait_for 30 "the primary on $GW:$P_PRIMARY" tcp_open_at "$GW" "$P_PRIMARY" ||
    die "the primary does not listen on $GW:$P_PRIMARY"
  log "primary up: 127.0.0.1:$P_PRIMARY and $GW:$P_PRIMARY (the pods' way in)"
}
primary_down() {
  tests/infra/postfix-primary.sh stop "$PRIMARY" 2>&1 | indent
  if tcp_open_at "$GW" "$P_PRIMARY" || tcp_open "$P_PRIMARY"; then
    die "the primary still accepts connections after it stopped"
  fi
  log "primary down: 127.0.0.1:$P_PRIMARY and $GW:$P_PRIMARY refuse connections"
}
cmdline "tests/infra/postfix-primary.sh start $PRIMARY $P_PRIMARY $DOMAIN   # + a listener on $GW"
primary_up
swaks --server "$GW:$P_PRIMARY" --quit-after EHLO --timeout 10 2>&1 | grep -E '^<-' | head -n 2 | indent || true

# ================================================================ 5
banner "Applying a BackupMx: $REPLICAS mx-pods for $DOMAIN, the backup MX published in PowerDNS"
cat > "$WORK/backupmx.yaml" << EOF
# from examples/backupmx.yaml + examples/dns-powerdns.yaml, for this machine
apiVersion: v1
kind: Secret
metadata:
  name: powerdns-credentials
type: Opaque
stringData:
  apiKey: $PDNS_API_KEY
---
apiVersion: backupmx.io/v1alpha1
kind: BackupMx
metadata:
  name: $BMX
spec:
  domains: [$DOMAIN]
  replicas: $REPLICAS
  primary:
    host: "$GW"              # where the pods reach the primary (the node's bridge)
    port: $P_PRIMARY
    healthCheck: {interval: 1s, timeout: 1s, failureThreshold: 2, successThreshold: 2}
  storage:
    size: 128Mi
    storageClassName: $SC
  mx:
    hostname: mx2.$DOMAIN
    priority: 20             # a higher number than the primary's MX
    ttl: 300
  replay:                    # slow on purpose, so the ramp can be watched
    maxWorkers: $MAXW
    ratePerSecond: $RATE
    rampUp: $RAMP
  dns:
    provider: powerdns
    zone: $DOMAIN
    credentialsSecretRef: {name: powerdns-credentials}
    powerdns:
      url: "$PDNS_API_URL"
      serverId: localhost
    nameservers: ["$PDNS_DNS"]   # verify the records there
EOF
sed 's/^\(  apiKey: \).*/\1(the PowerDNS API key)/' "$WORK/backupmx.yaml" | indent
cmdline "kubectl -n $NS apply -f backupmx.yaml"
t0=$(now)
kn apply -f "$WORK/backupmx.yaml" 2>&1 | indent
pods_ready() {
  local i
  for ((i = 0; i < REPLICAS; i++)); do
    pod_ready "$BMX-$i" || return 1
  done
}
log "waiting for the kubelet to run $REPLICAS pods (max 180 s)"
wait_for 180 "$REPLICAS Ready pods" pods_ready || {
  kn get pods,pvc -o wide 2>&1 | indent >&2
  tail -n 20 "$WORK/operator.log" | indent >&2
  die "the pods are not Ready"
}
T_PODS=$(since "$t0")
POD_IPS=()
for ((i = 0; i < REPLICAS; i++)); do POD_IPS+=("$(pod_ip "$BMX-$i")"); done
log "$REPLICAS pods Ready in ${T_PODS}s: ${POD_IPS[*]}"
cmdline "kubectl -n $NS get statefulset,pods,pvc -o wide"
kn get statefulset,pods,pvc -o wide 2>&1 | cut -c1-150 | indent || true

log "no cloud here: the demo plays the cloud controller and gives the LoadBalancer Service $BMX-smtp"
log "the address $LB_IP (kube-proxy routes it to the pods' port 2525); the operator publishes it"
cmdline "curl -X PATCH \$KUBE_API_URL/api/v1/namespaces/$NS/services/$BMX-smtp/status -d '{\"status\":{\"loadBalancer\":{\"ingress\":[{\"ip\":\"$LB_IP\"}]}}}'"
wait_for 60 "Service $BMX-smtp" kn get "service/$BMX-smtp" > /dev/null 2>&1 || die "no Service $BMX-smtp"
curl -sS --fail -m 10 --cacert "$KUBE_CA" -H "Authorization: Bearer $KUBE_TOKEN" \
  -X PATCH -H 'Content-Type: application/merge-patch+json' \
  -d "{\"status\":{\"loadBalancer\":{\"ingress\":[{\"ip\":\"$LB_IP\"}]}}}" \
  "$KUBE_API_URL/api/v1/namespaces/$NS/services/$BMX-smtp/status" > /dev/null ||
  die "could not write the Service's status.loadBalancer.ingress"
cmdline "kubectl -n $NS get service $BMX-smtp"
kn get service "$BMX-smtp" 2>&1 | indent || true
lb_answers() { swaks --server "$LB_IP:25" --quit-after EHLO --timeout 5 > "$WORK/lb.out" 2>&1; }
wait_for 30 "an SMTP greeting at $LB_IP:25" lb_answers || problem "nothing answers at the load balancer's address $LB_IP:25"
cmdline "swaks --server $LB_IP:25 --quit-after EHLO   # through kube-proxy to a pod"
grep -E '^<-' "$WORK/lb.out" | head -n 2 | indent || true
dns_ready() { [ "$(cond DNSReady)" = "True Published" ]; }
healthy() { [ "$(jp '{.status.primary.healthy}')" = true ] && [ "$(jp '{.status.replay.reason}')" = Full ]; }
wait_for 60 "DNSReady=True" dns_ready || problem "DNS not published: DNSReady $(cond DNSReady): $(jp '{.status.conditions[?(@.type=="DNSReady")].message}')"
wait_for 60 "the primary healthy, replay Full" healthy || problem "the operator does not see the primary healthy"
show_bmx
cmdline "kubectl -n $NS get bmx $BMX -o jsonpath='{.status.dns}'"
jp '{.status.dns}' | python3 -m json.tool 2>&1 | indent || true
cmdline "dig @127.0.0.1 -p $DNS_PORT $DOMAIN MX +noall +answer"
dig @127.0.0.1 -p "$DNS_PORT" "$DOMAIN" MX +noall +answer +time=2 +tries=2 2>&1 | tee "$WORK/dig-mx.out" | indent || true
cmdline "dig @127.0.0.1 -p $DNS_PORT mx2.$DOMAIN A +short"
dig @127.0.0.1 -p "$DNS_PORT" "mx2.$DOMAIN" A +short +time=2 +tries=2 2>&1 | indent || true
grep -qE "MX[[:space:]]+10 mail\.$DOMAIN\." "$WORK/dig-mx.out" || problem "dig: no MX 10 mail.$DOMAIN"
grep -qE "MX[[:space:]]+20 mx2\.$DOMAIN\." "$WORK/dig-mx.out" || problem "dig: no MX 20 mx2.$DOMAIN (the backup)"
cmdline "kubectl -n $NS get bmx $BMX -o jsonpath='{.status.replay}'"
jp '{.status.replay}' | indent
echo

# ================================================================ 6
banner "Stopping the primary (simulated outage)"
T_DOWN=$(now)
primary_down
log "waiting for the operator's probe (every 1 s, 2 failures = down; max 60 s)"
down() { [ "$(jp '{.status.replay.reason}')" = PrimaryDown ]; }
wait_for 60 "replay reason PrimaryDown" down || problem "the operator did not notice the outage"
log "the operator noticed after $(since "$T_DOWN")s and holds replay (0 workers in every pod):"
cmdline "kubectl -n $NS get bmx $BMX -o jsonpath='{.status.replay.reason} {.status.replay.workers} {.status.primary.lastError}'"
jp '{.status.replay.reason} {.status.replay.workers} {.status.primary.lastError}' | indent
echo
show_bmx

# ================================================================ 7
SENT_TSV=$WORK/sent.tsv
: > "$SENT_TSV"
SENT=0
VIA_FALLBACK=0
TRIED_PRIMARY=0
RUN=$$.$RANDOM
if [ "$SEND_MODE" = postfix ]; then
  banner "Sending $N messages through a sending Postfix: primary first, then the backup MX"
  # The sender cannot use the demo's DNS (Postfix asks the system resolver on port 53), so its
  # transport map names what DNS says: mail.example.com = 127.0.0.1, port $P_PRIMARY. Its
  # smtp_fallback_relay is the backup MX, here one pod per recipient so that every replica gets
  # mail (in production the LoadBalancer Service spreads it).
  pick_port P_SENDER
  (
    pf_layout "$SENDER"
    pf_prepare postfix-sender "mta.sender.test" "$P_SENDER"
    : > "$PF_ETC/transport"
    for ((i = 0; i < REPLICAS; i++)); do
      printf 'rcpt%d@%s  backup%d:[127.0.0.1]:%s\n' "$i" "$DOMAIN" "$i" "$P_PRIMARY" >> "$PF_ETC/transport"
      postconf -c "$PF_ETC" -Me "backup$i/unix=backup$i unix - - n - - smtp -o smtp_fallback_relay=[${POD_IPS[$i]}]:2525"
    done
    pf_conf transport_maps="texthash:$PF_ETC/transport" smtp_dns_support_level=disabled \
      default_destination_concurrency_limit=1 initial_destination_concurrency=1
    if [ "$SENDER_DSN" = 0 ]; then
      # the sender ignores the backup's DSN extension: no NOTIFY=/ORCPT= on RCPT TO
      pf_conf smtp_discard_ehlo_keywords=dsn
      log "DEMO_SENDER_DSN=0: the sender sends no DSN parameters (smtp_discard_ehlo_keywords = dsn)"
    fi
    pf_start "$P_SENDER" 30
  ) 2>&1 | sed '/giving .* o+x/d' | indent
  log "sender's transport map and fallback relays:"
  indent < "$SENDER/etc/transport"
  postconf -c "$SENDER/etc" -P 2> /dev/null | grep smtp_fallback_relay | indent || true
  SENDER_LOG=$SENDER/maillog
  refused_count() { grep -c "connect to 127.0.0.1\[127.0.0.1\]:$P_PRIMARY: Connection refused" "$SENDER_LOG" 2> /dev/null || true; }
  for ((i = 1; i <= N; i++)); do
    num=$(printf '%03d' "$i")
    p=$(((i - 1) % REPLICAS))
    rcpt="rcpt$p@$DOMAIN"
    before=$(refused_count)
    rc=0
    swaks --server "127.0.0.1:$P_SENDER" --timeout 20 --from alice@sender.test --to "$rcpt" \
      --header "Subject: demo message $num" --header "Message-Id: <demo-$num.$RUN@sender.test>" \
      --body "This is demo message $num of $N." > "$WORK/swaks.out" 2>&1 || rc=$?
    qid=$(sed -n 's/^<- *250 .*queued as \([0-9A-Za-z]*\).*/\1/p' "$WORK/swaks.out" | tail -n 1)
    if [ "$rc" != 0 ] || [ -z "$qid" ]; then
      problem "demo message $num: the sender's Postfix did not take it (swaks exit $rc)"
      tail -n 5 "$WORK/swaks.out" | indent
      continue
    fi
    # wait (max 30 s) until the sender's Postfix reports the delivery
    line=
    for ((w = 0; w < 300; w++)); do
      line=$(grep -E ": $qid: to=<$rcpt>.* status=" "$SENDER_LOG" 2> /dev/null | tail -n 1 || true)
      [ -n "$line" ] && break
      sleep 0.1
    done
    relay=$(sed -n 's/.* relay=\([^,]*\),.*/\1/p' <<< "$line")
    status=$(sed -n 's/.* status=\([a-z]*\).*/\1/p' <<< "$line")
    reply=$(sed -n 's/.* status=[a-z]* (\(.*\))$/\1/p' <<< "$line" | cut -c1-60)
    refused=$(($(refused_count) - before))
    [ "$refused" -ge 1 ] && TRIED_PRIMARY=$((TRIED_PRIMARY + 1))
    if [ "$status" = sent ] && [[ "$relay" == *"[${POD_IPS[$p]}]:2525" ]]; then
      SENT=$((SENT + 1))
      VIA_FALLBACK=$((VIA_FALLBACK + 1))
      printf '%s\t%s\t%s\n' "$num" "demo message $num" "$BMX-$p" >> "$SENT_TSV"
      log "demo message $num -> $rcpt: sender $qid: primary refused ($refused), relayed to $BMX-$p ${POD_IPS[$p]}:2525: $reply"
    else
      problem "demo message $num: sender $qid: status '${status:-none}' relay '${relay:-none}'"
      [ -n "$line" ] && indent <<< "$line"
    fi
    if ((i % 5 == 0 || i == N)); then
      sleep 2 # the operator refreshes status.queue every 2 s here
      kn get bmx 2>&1 | indent || true
    fi
  done
  log "the sender's log for the first message:"
  grep -E "connect to 127.0.0.1\[127.0.0.1\]:$P_PRIMARY|relay=" "$SENDER_LOG" | head -n 2 | cut -c1-200 | indent || true
else
  banner "Sending $N messages straight to the pods with swaks (DEMO_SEND=swaks)"
  log "(a sender's MTA would try the primary first; here swaks plays the sender reaching the backup)"
  for ((i = 1; i <= N; i++)); do
    num=$(printf '%03d' "$i")
    p=$(((i - 1) % REPLICAS))
    rcpt="rcpt$p@$DOMAIN"
    rc=0
    swaks --server "${POD_IPS[$p]}:2525" --timeout 20 --from alice@sender.test --to "$rcpt" \
      --header "Subject: demo message $num" --header "Message-Id: <demo-$num.$RUN@sender.test>" \
      --body "This is demo message $num of $N." > "$WORK/swaks.out" 2>&1 || rc=$?
    reply=$(grep -E '^<- +250 ' "$WORK/swaks.out" | tail -n 1 | sed 's/^<- *//' || true)
    if [ "$rc" = 0 ]; then
      SENT=$((SENT + 1))
      printf '%s\t%s\t%s\n' "$num" "demo message $num" "$BMX-$p" >> "$SENT_TSV"
      log "demo message $num -> $rcpt at $BMX-$p ${POD_IPS[$p]}:2525: $reply"
    else
      problem "demo message $num: swaks exit $rc"
      tail -n 5 "$WORK/swaks.out" | indent
    fi
    if ((i % 5 == 0 || i == N)); then
      sleep 2 # the operator refreshes status.queue every 2 s here
      kn get bmx 2>&1 | indent || true
    fi
  done
fi
LOADED=0
if [ "$LOAD" -gt 0 ]; then
  log "and $LOAD more with smtp-source, 4 sessions, to where the MX points: the load balancer $LB_IP:25"
  cmdline "smtp-source -s 4 -m $LOAD -l 2048 -S 'load message' -f loader@sender.test -t load@$DOMAIN $LB_IP:25"
  rc=0
  timeout 120 smtp-source -s 4 -m "$LOAD" -l 2048 -S 'load message' -f loader@sender.test \
    -t "load@$DOMAIN" "$LB_IP:25" > "$WORK/smtp-source.out" 2>&1 || rc=$?
  if [ "$rc" = 0 ] && ! grep -qiE 'error|warning|fatal' "$WORK/smtp-source.out"; then
    LOADED=$LOAD
    log "smtp-source: $LOAD messages accepted (exit 0, no errors)"
  else
    problem "smtp-source exit $rc: $(head -n 3 "$WORK/smtp-source.out" | tr '\n' ' ')"
  fi
  sleep 2 # the operator refreshes status.queue every 2 s here
  kn get bmx 2>&1 | indent || true
fi
TOTAL=$((SENT + LOADED))
LIVE=0
for ((i = 0; i < REPLICAS; i++)); do
  q=$(pod_queue "${POD_IPS[$i]}")
  log "$BMX-$i (${POD_IPS[$i]}) queues $q message(s)  (GET /v1/queue on its admin API)"
  [[ "$q" =~ ^[0-9]+$ ]] && LIVE=$((LIVE + q))
done
[ "$LIVE" = "$TOTAL" ] || problem "the pods queue $LIVE messages, $TOTAL were accepted"
log "waiting for the operator's status to count them (it reads every pod's queue; max 30 s)"
counted() { [ "$(jp '{.status.queue.messages}')" = "$TOTAL" ]; }
wait_for 30 "status.queue.messages = $TOTAL" counted || true
QUEUED=$(jp '{.status.queue.messages}')
QUEUED=${QUEUED:-0}
[ "$QUEUED" = "$((N + LOAD))" ] || problem "status.queue.messages is $QUEUED, expected $((N + LOAD))"
show_bmx
cmdline "kubectl -n $NS get bmx $BMX -o jsonpath='{.status.replay.reason}'"
jp '{.status.replay.reason}' | indent
echo
cmdline "kubectl -n $NS exec $BMX-0 -- mx-pod queue list --config /etc/mx-pod/config/mx-pod.toml"
if ! kn exec "$BMX-0" -- mx-pod queue list --config /etc/mx-pod/config/mx-pod.toml > "$WORK/queue-list.out" 2>&1; then
  warn "kubectl exec failed; the pod's admin API instead:"
  admin_get "${POD_IPS[0]}" "/v1/queue/messages?limit=5" > "$WORK/queue-list.out" 2>&1 || true
fi
head -n 14 "$WORK/queue-list.out" | cut -c1-150 | indent || true

# ================================================================ 8
banner "Starting the primary again; the operator ramps replay up (maxWorkers $MAXW over $RAMP, $RATE msg/s per pod)"
T_UP=$(now)
OUTAGE_S=$(awk -v a="$T_DOWN" -v b="$T_UP" 'BEGIN { printf "%.1f", b - a }')
primary_up
MAILDIR=$PRIMARY/mail/inbox
in_maildir() { { find "$MAILDIR/new" "$MAILDIR/cur" -type f 2> /dev/null || true; } | wc -l; }
STEPS_SEEN=()
last=
left='?'
printf '    %6s  %-12s %7s  %-14s %-24s %s\n' "t" "reason" "workers" "status.queue" "pods' own queues" "primary's maildir"
for ((s = 0; s <= REPLAY_T; s++)); do
  read -r reason workers squeue _ <<< "$(jp '{.status.replay.reason} {.status.replay.workers} {.status.queue.messages}') - - -"
  pq=
  left=0
  for ((i = 0; i < REPLICAS; i++)); do
    q=$(pod_queue "${POD_IPS[$i]}")
    pq="$pq $BMX-$i=$q"
    if [[ "$q" =~ ^[0-9]+$ ]]; then left=$((left + q)); else left='?'; fi
  done
  got=$(in_maildir)
  printf '    %5ss  %-12s %7s  %-14s %-24s %s\n' "$s" "$reason" "$workers" "$squeue" "${pq# }" "$got/$((N + LOAD))"
  if [ "$reason/$workers" != "$last" ]; then
    STEPS_SEEN+=("$reason/$workers")
    last="$reason/$workers"
  fi
  if [ "$left" = 0 ] && [ "$got" -ge "$TOTAL" ]; then break; fi
  sleep 1
done
DRAIN_S=$(since "$T_UP")
if [ "$left" != 0 ]; then
  problem "the pods' queues are not empty after ${REPLAY_T}s ($left left)"
  for ((i = 0; i < REPLICAS; i++)); do
    log "$BMX-$i: GET /v1/replay, then its last log lines:"
    admin_get "${POD_IPS[$i]}" /v1/replay 2>&1 | cut -c1-400 | indent || true
    echo
    kn logs "$BMX-$i" --tail=12 2>&1 | cut -c1-250 | indent || true
  done
else
  log "every pod's queue is empty ${DRAIN_S}s after the primary came back"
fi
# what the pods refused to keep: 5xx answers from the primary bounce a message to its sender
BOUNCED=0
ORCPT_BUG=0
for ((i = 0; i < REPLICAS; i++)); do
  kn logs "$BMX-$i" > "$WORK/pod-$i.log" 2>&1 || true
  n=$(grep -c '"message":"bounced"' "$WORK/pod-$i.log" || true)
  BOUNCED=$((BOUNCED + n))
  if grep -q 'Bad ORCPT parameter syntax' "$WORK/pod-$i.log"; then ORCPT_BUG=1; fi
done
[ "$BOUNCED" = 0 ] || problem "the pods bounced $BOUNCED message(s) to their senders (a 5xx from the primary during replay)"
if [ "$ORCPT_BUG" = 1 ]; then
  problem "the primary answered the pods' RCPT TO with '501 5.5.4 Bad ORCPT parameter syntax': mx-pod replays the ORCPT of a DSN-capable sender without its 'rfc822;' type (DEMO_SENDER_DSN=0 or DEMO_SEND=swaks avoid it)"
fi
ramped=no
for st in "${STEPS_SEEN[@]}"; do case "$st" in RampingUp/*) ramped=yes ;; esac; done
[ "$ramped" = yes ] || warn "no RampingUp step was seen (replay finished before the status showed one?)"
empty() { [ "$(jp '{.status.queue.messages}')" = 0 ]; }
wait_for 30 "status.queue.messages = 0" empty || problem "status.queue.messages does not reach 0"
final=$(jp '{.status.replay.reason}/{.status.replay.workers}')
if [ -n "$final" ] && [ "$final" != "$last" ]; then STEPS_SEEN+=("$final"); fi
log "replay as the operator decided it (reason/workers): ${STEPS_SEEN[*]}"
show_bmx
cmdline "kubectl -n $NS get bmx $BMX -o jsonpath='{.status.replay}'"
jp '{.status.replay}' | indent
echo
cmdline "kubectl -n $NS get events --sort-by=.metadata.creationTimestamp | grep -i backupmx/"
kn get events --sort-by=.metadata.creationTimestamp 2>&1 | grep -iE 'backupmx/|LAST SEEN' |
  awk 'NR == 1 { print; next } { l[NR] = $0 } END { for (i = (NR > 16 ? NR - 14 : 2); i <= NR; i++) print l[i] }' |
  cut -c1-170 | indent || true

# ================================================================ 9
banner "Checking the primary's maildir: every message exactly once, in arrival order per pod"
sleep 1 # a duplicate would arrive right behind the others
log "order source: the primary's maillog (one smtpd 'info: END-OF-MESSAGE' line per committed message)"
python3 demo/check-delivery.py "$MAILDIR" "$PRIMARY/maillog" "$SENT_TSV" > "$WORK/check.out" 2>&1 || true
sed '$d' "$WORK/check.out" | indent
DELIVERED=0 DUPS=0 OOO=0 IN_LOG=0 LOAD_GOT=0
if [ "$(tail -n 1 "$WORK/check.out" | cut -d' ' -f1)" = RESULT ]; then
  read -r _ DELIVERED DUPS OOO IN_LOG LOAD_GOT < <(tail -n 1 "$WORK/check.out")
else
  problem "the maildir/maillog check itself failed (see above)"
fi
LOST=$((N - DELIVERED))
[ "$DELIVERED" = "$N" ] || problem "$DELIVERED of $N messages are in the primary's maildir"
[ "$DUPS" = 0 ] || problem "$DUPS duplicate deliveries"
[ "$OOO" = 0 ] || problem "$OOO message(s) out of order"
[ "$IN_LOG" = "$N" ] || problem "the primary's maillog shows $IN_LOG receptions, expected $N"
[ "$LOAD_GOT" = "$LOADED" ] || problem "$LOAD_GOT of the $LOADED smtp-source messages are in the primary's maildir"

# ================================================================ 10
banner "Summary"
row() { printf '    %-44s %9s %9s  %s\n' "$@"; }
row "check" "value" "expected" "result"
row "sent (numbered messages)" "$SENT" "$N" "$(ok "$SENT" "$N")"
if [ "$SEND_MODE" = postfix ]; then
  row "  sender's Postfix tried the primary first" "$TRIED_PRIMARY" "$N" "$(ok "$TRIED_PRIMARY" "$N")"
  row "  then relayed them to the backup (fallback)" "$VIA_FALLBACK" "$N" "$(ok "$VIA_FALLBACK" "$N")"
  [ "$TRIED_PRIMARY" = "$N" ] || problem "the sender tried the primary first for $TRIED_PRIMARY of $N messages"
else
  row "  (sent straight to the pods with swaks)" "-" "-" ""
fi
row "smtp-source load through the load balancer" "$LOADED" "$LOAD" "$(ok "$LOADED" "$LOAD")"
row "queued (kubectl get bmx: status.queue)" "$QUEUED" "$((N + LOAD))" "$(ok "$QUEUED" "$((N + LOAD))")"
row "delivered to the primary's maildir" "$DELIVERED" "$N" "$(ok "$DELIVERED" "$N")"
row "  and the smtp-source load" "$LOAD_GOT" "$LOAD" "$(ok "$LOAD_GOT" "$LOAD")"
row "lost" "$LOST" 0 "$(ok "$LOST" 0)"
row "bounced by the pods (5xx from the primary)" "$BOUNCED" 0 "$(ok "$BOUNCED" 0)"
row "duplicates" "$DUPS" 0 "$(ok "$DUPS" 0)"
row "out of order (per pod)" "$OOO" 0 "$(ok "$OOO" 0)"
row "outage duration (s)" "$OUTAGE_S" "-" ""
row "time to drain after the primary came back (s)" "$DRAIN_S" "-" ""
row "replay steps seen" "${#STEPS_SEEN[@]}" "-" "${STEPS_SEEN[*]}"
row "start-up: control plane / node / pods (s)" "${T_CP%.*}/${T_NODE%.*}/${T_PODS%.*}" "-" ""
row "run time so far (s)" "$(since "$T_RUN" | cut -d. -f1)" "-" ""
problems_exit
