#!/bin/bash
# start.sh - join a REAL node (containerd + runc + CNI bridge + kubelet [+ kube-proxy]) to the
# control plane that tests/infra/kube/start.sh KUBESTATEDIR runs (with kube-controller-manager
# and kube-scheduler). Adapted from the workplace recipe kube-node/start-node.sh. Everything
# stays under STATEDIR; containerd and kubelet run in a private mount namespace, so their mounts
# (overlay rootfs, netns, secret tmpfs...) never show up on the host and vanish when stop.sh
# ends the processes.
#
#   start.sh STATEDIR KUBESTATEDIR
#
# env (all optional):
#   KNODE_BIN_DIR     dir with kubelet, knode-cri (+ kube-proxy); default: the control plane's
#                     ${KUBE_BIN_DIR:-${BACKUPMX_KUBE_BIN:-$HOME/.cache/backupmx/kube-1.20/bin}}
#                     (tests/infra/node/build.sh builds them there)
#   KNODE_NAME        node name [default: $(hostname), lowercased]
#   KNODE_POD_CIDR    [10.244.0.0/24]   KNODE_BRIDGE [knode0]
#   KNODE_NODE_IP     node InternalIP [default: the bridge's gateway, the first address of
#                     KNODE_POD_CIDR (10.244.0.1)]. start.sh creates the bridge with that address
#                     before the kubelet starts, so the host owns it from the beginning: pods reach
#                     the host there (e.g. a primary MX listening on 10.244.0.1), the host reaches
#                     pods on their pod IPs, and nothing is on the machine's outside interfaces.
#   KNODE_KUBELET_ADDRESS  kubelet API listen address [default: KNODE_NODE_IP]. The API server
#                     reaches it for logs/exec/port-forward when it is started with
#                     KUBE_APISERVER_EXTRA_ARGS=--kubelet-preferred-address-types=InternalIP (the
#                     Rust harness does; otherwise it dials the node's host name)
#   KNODE_IMAGES      image tarballs (docker-archive/OCI) to import, space separated
#   KNODE_PAUSE_IMAGE sandbox image name [k8s.gcr.io/pause:3.2]; built from pause.c
#                     (gcc -static, make-pause-image.sh) and imported if containerd lacks it
#   KNODE_WITH_PROXY  1 = run kube-proxy (iptables mode) [1 if the binary exists]
#   KNODE_SNAPSHOTTER overlayfs | native [auto: overlayfs if an overlay mount works]
#   KNODE_READY_TIMEOUT seconds to wait for Node Ready [120]
#   KNODE_KUBELET_EXTRA_ARGS / KNODE_PROXY_EXTRA_ARGS
#   KNODE_OWNER_PID   PID of the process that owns this node (a Rust test binary passes
#                     std::process::id()): a detached watchdog (STATEDIR/watchdog.pid, log
#                     STATEDIR/logs/watchdog.log; the control plane's ../kube/watchdog.sh) runs
#                     `stop.sh STATEDIR --purge` once that process is gone, so host state is
#                     restored even after a crash.
#
# Host-wide side effects (all undone by stop.sh): sysctls net.ipv4.ip_forward=1,
# net.bridge.bridge-nf-call-iptables=1, plus those kubelet sets itself
# (vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1, ...; values saved
# first); bridge KNODE_BRIDGE (+ its address) + veths; iptables chains KUBE-* / CNI-*; cgroups
# /sys/fs/cgroup/*/kubepods; empty dirs /var/log/pods /var/log/containers /var/lib/kubelet
# /var/lib/cni /run/containerd if missing (bind-mounted to STATEDIR inside the namespace).
# One node per machine (fixed kubelet ports 10248/10250, fixed bridge, host-wide cleanup).
set -euo pipefail

STATEDIR=${1:?usage: start-node.sh STATEDIR KUBESTATEDIR}
KSTATE=${2:?usage: start-node.sh STATEDIR KUBESTATEDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
STATEDIR=$(realpath -m "$STATEDIR")
KSTATE=$(cd "$KSTATE" && pwd)
T0=$EPOCHREALTIME
log() { echo "[node-start +$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.1f", b-a}')s] $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }
for p in nsholder containerd kubelet kube-proxy; do
  alive "$STATEDIR/$p.pid" && { echo "already running in $STATEDIR ($p); run stop.sh first" >&2; exit 1; }
done
[ -f "$KSTATE/env" ] || { echo "no $KSTATE/env: start the control plane with tests/infra/kube/start.sh $KSTATE" >&2; exit 1; }
# shellcheck disable=SC1091
source "$KSTATE/env"     # KUBECONFIG, KUBE_API_URL, PATH += kube bin dir (kubectl)
command -v kubectl >/dev/null || { echo "kubectl not found (KUBE_BIN_DIR of the control plane)" >&2; exit 1; }

# ---- binaries
KNODE_BIN_DIR=${KNODE_BIN_DIR:-${KUBE_BIN_DIR:-${BACKUPMX_KUBE_BIN:-${HOME:-/root}/.cache/backupmx/kube-1.20/bin}}}
KUBELET=$KNODE_BIN_DIR/kubelet; PROXY=$KNODE_BIN_DIR/kube-proxy; KCRI=$KNODE_BIN_DIR/knode-cri
for b in "$KUBELET" "$KCRI"; do
  [ -x "$b" ] || { echo "no $b; build it: bash $HERE/build.sh $KNODE_BIN_DIR (or: make deps)" >&2; exit 1; }
done
if [ -z "${KNODE_WITH_PROXY:-}" ]; then [ -x "$PROXY" ] && KNODE_WITH_PROXY=1 || KNODE_WITH_PROXY=0; fi

# ---- packages (Debian): containerd runc CNI plugins iptables conntrack gcc+libc (pause) nftables (cleanup)
MISSING=()
for pair in containerd:containerd runc:runc ctr:containerd iptables:iptables conntrack:conntrack gcc:gcc \
            nft:nftables; do
  command -v "${pair%%:*}" >/dev/null || MISSING+=("${pair#*:}")
done
[ -x /usr/lib/cni/bridge ] || MISSING+=(containernetworking-plugins)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || [ -n "$(ls /usr/lib/*/libc.a 2>/dev/null)" ] || MISSING+=(libc6-dev)
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "[node-start] apt-get install ${MISSING[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  APT=(apt-get -o DPkg::Lock::Timeout=900 -y --no-install-recommends)
  "${APT[@]}" install "${MISSING[@]}" >/dev/null || { apt-get update -qq; "${APT[@]}" install "${MISSING[@]}" >/dev/null; }
fi
CNI_BIN=/usr/lib/cni

NODE=${KNODE_NAME:-$(hostname | tr '[:upper:]' '[:lower:]')}
POD_CIDR=${KNODE_POD_CIDR:-10.244.0.0/24}
BRIDGE=${KNODE_BRIDGE:-knode0}
PAUSE=${KNODE_PAUSE_IMAGE:-k8s.gcr.io/pause:3.2}
TIMEOUT=${KNODE_READY_TIMEOUT:-120}
# the bridge's (= the host's) address on the pod network: the first address of POD_CIDR
[[ "$POD_CIDR" =~ ^([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)/([0-9]+)$ ]] ||
  { echo "KNODE_POD_CIDR must be an IPv4 CIDR, not '$POD_CIDR'" >&2; exit 1; }
GATEWAY=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}.$((BASH_REMATCH[4] + 1))
PREFIX=${BASH_REMATCH[5]}
NODE_IP=${KNODE_NODE_IP:-$GATEWAY}
# In a /24, pods get .2-.239; .240-.254 are kept for "load balancer" addresses a test writes
# into a Service's status.loadBalancer.ingress (kube-proxy routes them to the pods, as a cloud
# load balancer would). KNODE_LB_IP is the first of them.
RANGE_END='' LB_IP=''
if [ "$PREFIX" = 24 ]; then
  RANGE_END=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}.239
  LB_IP=${BASH_REMATCH[1]}.${BASH_REMATCH[2]}.${BASH_REMATCH[3]}.240
fi
KUBELET_ADDR=${KNODE_KUBELET_ADDRESS:-$NODE_IP}
OWNER_PID=${KNODE_OWNER_PID:-}
starttime() { { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null || true; } | cut -d' ' -f20; }
if [ -n "$OWNER_PID" ]; then
  [[ "$OWNER_PID" =~ ^[0-9]+$ ]] || { echo "KNODE_OWNER_PID must be a PID, not '$OWNER_PID'" >&2; exit 1; }
  OWNER_START=$(starttime "$OWNER_PID")
  [ -n "$OWNER_START" ] || { echo "KNODE_OWNER_PID=$OWNER_PID: no such process" >&2; exit 1; }
fi
# refuse before touching anything if another node (or a crashed one never stopped) is there:
# stop.sh's cleanup (iptables KUBE-*/CNI-* chains, kubepods cgroups) is host-wide
for p in 10250 10248; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p is in use: another kubelet runs here (stop it with stop.sh ITS_STATEDIR)" >&2; exit 1; fi
done
if ip link show "$BRIDGE" >/dev/null 2>&1; then
  echo "bridge $BRIDGE exists: another node runs (or ran) here; stop.sh its STATEDIR or 'ip link del $BRIDGE'" >&2; exit 1
fi

mkdir -p "$STATEDIR"/{logs,images,containerd/root,containerd/state,run-containerd,cni/net.d,cni/ipam,cni/cache,log/pods,log/containers,kubelet,var-lib-kubelet}
SOCK=$STATEDIR/containerd/containerd.sock
printf 'KCRI=%q\nSOCK=%q\nBRIDGE=%q\n' "$KCRI" "$SOCK" "$BRIDGE" > "$STATEDIR/knode.vars"   # for stop.sh
fail() {
  echo "[node-start] ERROR: $*" >&2
  for f in "$STATEDIR"/logs/*.log; do [ -f "$f" ] && { echo "--- tail $f" >&2; tail -n 30 "$f" >&2; }; done
  bash "$HERE/stop.sh" "$STATEDIR" >&2 || true
  exit 1
}

# ---- watchdog (before any host state is touched, so an owner dying during start-up is
# covered too; it waits for this script to finish first)
if [ -n "$OWNER_PID" ]; then
  if [ -f "$STATEDIR/watchdog.pid" ]; then bash "$HERE/stop.sh" "$STATEDIR" --watchdog-only; fi
  setsid nohup bash "$HERE/../kube/watchdog.sh" "$STATEDIR" "$OWNER_PID" "$OWNER_START" "$$" "$(starttime $$)" \
    "$HERE/stop.sh" </dev/null >/dev/null 2>>"$STATEDIR/logs/watchdog.log" &
  echo $! > "$STATEDIR/watchdog.pid"
  log "watchdog (pid $!) will run stop.sh --purge when pid $OWNER_PID exits"
fi

# ---- host-wide state we touch: save it once (a crashed run's saved values win)
SYSCTLS="net/ipv4/ip_forward net/bridge/bridge-nf-call-iptables net/bridge/bridge-nf-call-ip6tables
  vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys
  kernel/keys/root_maxbytes net/ipv4/conf/all/route_localnet net/netfilter/nf_conntrack_max
  net/netfilter/nf_conntrack_tcp_timeout_established net/netfilter/nf_conntrack_tcp_timeout_close_wait"
if [ ! -f "$STATEDIR/sysctl.saved" ]; then
  for s in $SYSCTLS; do [ -f "/proc/sys/$s" ] && echo "$s $(cat "/proc/sys/$s")"; done > "$STATEDIR/sysctl.saved.tmp"
  mv "$STATEDIR/sysctl.saved.tmp" "$STATEDIR/sysctl.saved"
fi
echo 1 > /proc/sys/net/ipv4/ip_forward
[ -f /proc/sys/net/bridge/bridge-nf-call-iptables ] && echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables \
  || log "WARNING: no br_netfilter (ClusterIP -> pod on the same bridge may not work)"
[ -f "$STATEDIR/hostdirs.created" ] || : > "$STATEDIR/hostdirs.created"
# iptables tables that exist before us (stop.sh deletes the ones kubelet/kube-proxy add, if empty)
[ -f "$STATEDIR/iptables-tables.before" ] || { for x in iptables ip6tables; do
  "$x-save" 2>/dev/null | sed -n "s/^\*/$x /p"; done > "$STATEDIR/iptables-tables.before"; }
# host paths hard-coded in kubelet 1.20 / containerd 1.6 / libcni, redirected into STATEDIR
# (inside the node's mount namespace only): pod logs, device-plugin socket, CNI cache, shim sockets
declare -A BINDS=([/var/log/pods]=log/pods [/var/log/containers]=log/containers
                  [/var/lib/kubelet]=var-lib-kubelet [/var/lib/cni]=cni/cache [/run/containerd]=run-containerd)
for d in "${!BINDS[@]}"; do
  if [ ! -d "$d" ]; then mkdir -p "$d"; echo "$d" >> "$STATEDIR/hostdirs.created"; fi
done

# ---- private mount namespace, held by a sleeping process
log "mount namespace (holder) + bind mounts"
BINDCMDS=""
for d in "${!BINDS[@]}"; do BINDCMDS+="mount --bind '$STATEDIR/${BINDS[$d]}' '$d' && "; done
rm -f "$STATEDIR/nsholder.ready"
setsid unshare --mount --propagation slave -- sh -c \
  "${BINDCMDS} touch '$STATEDIR/nsholder.ready' && exec sleep infinity" \
  </dev/null >"$STATEDIR/logs/nsholder.log" 2>&1 &
echo $! > "$STATEDIR/nsholder.pid"
HOLDER=$(cat "$STATEDIR/nsholder.pid")
for _ in $(seq 1 50); do [ -f "$STATEDIR/nsholder.ready" ] && break; alive "$STATEDIR/nsholder.pid" || break; sleep 0.1; done
[ -f "$STATEDIR/nsholder.ready" ] || fail "mount namespace setup failed"
readlink "/proc/$HOLDER/ns/mnt" > "$STATEDIR/mntns"
INNS=(nsenter -t "$HOLDER" -m --)

# ---- snapshotter
SNAP=${KNODE_SNAPSHOTTER:-}
if [ -z "$SNAP" ]; then
  o=$STATEDIR/containerd/overlay-test; mkdir -p "$o"/{l,u,w,m}
  if "${INNS[@]}" sh -c "mount -t overlay overlay -o lowerdir=$o/l,upperdir=$o/u,workdir=$o/w $o/m && umount $o/m" 2>/dev/null
  then SNAP=overlayfs; else SNAP=native; fi
  rm -rf "$o"
fi
log "snapshotter: $SNAP"

# ---- containerd
CG=$STATEDIR/containerd
cat > "$CG/config.toml" <<EOF
version = 2
root = "$CG/root"
state = "$CG/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$CG/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "$CG/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # this VM lacks CAP_SYS_RESOURCE: oom_score_adj can only be raised, never lowered below
  # containerd's own (runc fails with "can't get final child's PID from pipe: EOF" otherwise)
  restrict_oom_score_adj = true
  max_container_log_line_size = 16384
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "$SNAP"
    default_runtime_name = "runc"
    discard_unpacked_layers = false
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "$(command -v runc)"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$STATEDIR/cni/net.d"
    max_conf_num = 1
EOF
cat > "$STATEDIR/cni/net.d/10-knode.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "knode",
  "plugins": [
    { "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": { "type": "host-local", "dataDir": "$STATEDIR/cni/ipam",
                "ranges": [[{ "subnet": "$POD_CIDR", "gateway": "$GATEWAY"${RANGE_END:+, \"rangeEnd\": \"$RANGE_END\"} }]] } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
EOF
# No default route in the pods: they reach the pod network (other pods, the host at $GATEWAY)
# and nothing else. The bridge exists from now on with the gateway address (the CNI bridge
# plugin adopts it), so the host can listen on $GATEWAY before the first pod runs.
echo "$BRIDGE" > "$STATEDIR/bridge.created"
ip link add "$BRIDGE" type bridge || fail "cannot create bridge $BRIDGE"
ip addr add "$GATEWAY/$PREFIX" dev "$BRIDGE" || fail "cannot add $GATEWAY/$PREFIX to $BRIDGE"
ip link set "$BRIDGE" up || fail "cannot bring $BRIDGE up"
log "bridge $BRIDGE up with $GATEWAY/$PREFIX"

log "starting containerd ($SOCK)"
setsid "${INNS[@]}" containerd --config "$CG/config.toml" </dev/null >"$STATEDIR/logs/containerd.log" 2>&1 &
echo $! > "$STATEDIR/containerd.pid"
CRI=(timeout 60 "$KCRI" -e "unix://$SOCK")
for i in $(seq 1 150); do
  [ -S "$SOCK" ] && "${CRI[@]}" -t 2s status >/dev/null 2>&1 && break
  alive "$STATEDIR/containerd.pid" || fail "containerd exited"
  [ "$i" = 150 ] && fail "containerd CRI not up after 30s"
  sleep 0.2
done
CTR=("${INNS[@]}" ctr --address "$SOCK" -n k8s.io)

# ---- images (no registry: import tarballs)
if ! "${CTR[@]}" images ls -q | grep -qx "$PAUSE"; then
  if [ ! -f "$STATEDIR/images/pause.tar" ]; then
    log "building pause image $PAUSE (gcc -static pause.c)"
    bash "$HERE/make-pause-image.sh" "$STATEDIR/images/pause.tar" "$PAUSE" 2>/dev/null
  fi
  KNODE_IMAGES="$STATEDIR/images/pause.tar ${KNODE_IMAGES:-}"
fi
for t in ${KNODE_IMAGES:-}; do
  t=$(realpath "$t")   # ctr runs via nsenter: relative paths would not resolve
  "${CTR[@]}" images import --snapshotter "$SNAP" "$t" >>"$STATEDIR/logs/ctr-import.log" 2>&1 \
    || fail "ctr images import $t failed: $(tail -n 3 "$STATEDIR/logs/ctr-import.log")"
  log "imported $t"
done

# ---- kubelet
KL=$STATEDIR/kubelet
cat > "$STATEDIR/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $KUBELET_ADDR
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupsPerQOS: true
cgroupRoot: /
failSwapOn: false
protectKernelDefaults: false
makeIPTablesUtilChains: true
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {"memory.available": "50Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%", "imagefs.available": "1%"}
nodeStatusUpdateFrequency: 2s     # default 10s: Ready ~10s sooner after registration
syncFrequency: 10s
fileCheckFrequency: 20s
volumeStatsAggPeriod: 1m
podPidsLimit: -1
runtimeRequestTimeout: 5m
maxPods: 110
EOF
log "starting kubelet (node $NODE)"
KUBELET_T0=$(date +%s)
# shellcheck disable=SC2086
setsid "${INNS[@]}" "$KUBELET" --config="$STATEDIR/kubelet-config.yaml" \
  --kubeconfig="$KSTATE/kubeconfig" --root-dir="$KL" --cert-dir="$KL/pki" \
  --container-runtime=remote --container-runtime-endpoint="unix://$SOCK" \
  --hostname-override="$NODE" \
  --node-ip="$NODE_IP" \
  --node-labels="knode=true" --v=1 ${KNODE_KUBELET_EXTRA_ARGS:-} \
  </dev/null >"$STATEDIR/logs/kubelet.log" 2>&1 &
echo $! > "$STATEDIR/kubelet.pid"

# Ready=True with a heartbeat from *this* kubelet (a restarted node still shows the old Ready)
for i in $(seq 1 $(( TIMEOUT * 2 ))); do
  st=$(kubectl get node "$NODE" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.status.conditions[?(@.type=="Ready")].lastHeartbeatTime}' 2>/dev/null || true)
  if [ "${st%% *}" = True ] && [ "$(date -d "${st#* }" +%s 2>/dev/null || echo 0)" -ge "$KUBELET_T0" ]; then break; fi
  alive "$STATEDIR/kubelet.pid" || fail "kubelet exited"
  [ "$i" = $(( TIMEOUT * 2 )) ] && fail "node $NODE not Ready after ${TIMEOUT}s"
  sleep 0.5
done
log "node $NODE Ready"
# The NotReady taint added at registration is removed by KCM's nodelifecycle controller;
# tests/infra/kube/start.sh turns that controller off by default -> remove the taint ourselves.
KCMPID=$(cat "$KSTATE/kube-controller-manager.pid" 2>/dev/null || true)
if [ -z "$KCMPID" ] || ! kill -0 "$KCMPID" 2>/dev/null \
   || tr '\0' ' ' < "/proc/$KCMPID/cmdline" | grep -q -- '-nodelifecycle'; then
  if kubectl get node "$NODE" -o jsonpath='{.spec.taints[*].key}' | grep -q 'node.kubernetes.io/not-ready'; then
    kubectl taint node "$NODE" node.kubernetes.io/not-ready:NoSchedule- >/dev/null 2>&1 || true
    log "removed taint node.kubernetes.io/not-ready (nodelifecycle controller not running)"
  fi
fi

# ---- kube-proxy (iptables mode)
if [ "$KNODE_WITH_PROXY" = 1 ]; then
  log "starting kube-proxy (iptables)"
  # shellcheck disable=SC2086
  setsid "$PROXY" --kubeconfig="$KSTATE/kubeconfig" --hostname-override="$NODE" \
    --proxy-mode=iptables --cluster-cidr="$POD_CIDR" \
    --bind-address=127.0.0.1 --healthz-bind-address=127.0.0.1:10256 --metrics-bind-address=127.0.0.1:10249 \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 \
    --v=1 ${KNODE_PROXY_EXTRA_ARGS:-} \
    </dev/null >"$STATEDIR/logs/kube-proxy.log" 2>&1 &
  echo $! > "$STATEDIR/kube-proxy.pid"
  for i in $(seq 1 60); do
    iptables -t nat -S KUBE-SERVICES >/dev/null 2>&1 && break
    alive "$STATEDIR/kube-proxy.pid" || fail "kube-proxy exited"
    [ "$i" = 60 ] && fail "kube-proxy: no KUBE-SERVICES chain after 30s"
    sleep 0.5
  done
fi

cat > "$STATEDIR/env" <<EOF
source $KSTATE/env
export KNODE_NAME=$NODE
export KNODE_NODE_IP=$NODE_IP
export KNODE_GATEWAY=$GATEWAY
export KNODE_POD_CIDR=$POD_CIDR
export KNODE_LB_IP=$LB_IP
export KNODE_STATEDIR=$STATEDIR
export KNODE_CRI_ENDPOINT=unix://$SOCK
export KNODE_SNAPSHOTTER=$SNAP
# ctr / knode-cri in the node's mount namespace:
knode-ctr() { nsenter -t \$(cat $STATEDIR/nsholder.pid) -m -- ctr --address $SOCK -n k8s.io "\$@"; }
knode-cri() { $KCRI -e unix://$SOCK "\$@"; }
knode-import() { local t; for t in "\$@"; do knode-ctr images import --snapshotter $SNAP "\$(realpath "\$t")" || return 1; done; }
EOF
log "ready: source $STATEDIR/env  (node $NODE at $NODE_IP, pods $POD_CIDR on $BRIDGE, snapshotter $SNAP)"
