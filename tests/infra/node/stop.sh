#!/bin/bash
# stop.sh - stop what start.sh started in STATEDIR and undo its host-wide changes (adapted from
# the workplace recipe kube-node/stop-node.sh). Processes are found via PID files only
# (STATEDIR/*.pid and containerd's own init.pid files), checked against the expected executable;
# never by name.
#
#   stop.sh STATEDIR [--purge]      --purge also deletes STATEDIR
#   (--watchdog-only, used by start.sh, stops just the watchdog)
#
# Order: the watchdog (unless it is the caller), kube-proxy, kubelet -> every pod sandbox stopped
# + removed through CRI (CNI DEL: veth, IP lease, portmap rules) -> containerd -> leftover
# container inits -> mount-namespace holder (all overlay/netns/tmpfs mounts vanish with it) ->
# bridge, iptables KUBE-*/CNI-* chains, kubepods cgroups, sysctls, host dirs.
# The Node object stays in the API (delete it yourself if the cluster lives on).
# Best effort: always exits 0 (a missing STATEDIR is fine). About 1-2 s.
set -uo pipefail
STATEDIR=${1:?usage: stop.sh STATEDIR [--purge]}
MODE=${2:-}
case $MODE in
  '' | --purge | --watchdog-only) ;;
  *) echo "[node-stop] ERROR: unknown option $MODE (usage: stop.sh STATEDIR [--purge])" >&2; exit 2 ;;
esac
[ -d "$STATEDIR" ] || { echo "[node-stop] no such dir: $STATEDIR" >&2; exit 0; }
STATEDIR=$(cd "$STATEDIR" && pwd)
log() { echo "[node-stop] $*" >&2; }
# term_wait_kill and stop_watchdog, shared with the kube tier's stop.sh
# shellcheck source=tests/infra/proc-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/../proc-lib.sh"
# alive = exists and is not a zombie (this VM's init reaps orphans only every second or so)
pid_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" != Z ]; }
stop_pid() {  # $1 = pid file, $2 = seconds to wait after TERM, $3 = expected executable name (guards
  local f=$1 w=${2:-10} exe=${3:-} pid   # against a recycled PID from a stale pid file)
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if [ -n "$exe" ] && pid_alive "$pid" && [ "$(basename "$(readlink "/proc/$pid/exe" 2>/dev/null)")" != "$exe" ]; then
    log "pid $pid from $(basename "$f") is not $exe any more (stale pid file), not touching it"; rm -f "$f"; return 0
  fi
  if pid_alive "$pid"; then
    term_wait_kill pid_alive "$pid" $(( w * 10 ))
    log "stopped $(basename "$f" .pid) (pid $pid)"
  fi
  rm -f "$f"
}

stop_watchdog "$STATEDIR" pid_alive
[ "$MODE" = --watchdog-only ] && exit 0

stop_pid "$STATEDIR/kube-proxy.pid" 5 kube-proxy
stop_pid "$STATEDIR/kubelet.pid" 10 kubelet

# ---- pods: stop + remove all sandboxes via CRI while containerd still runs
SOCK=$STATEDIR/containerd/containerd.sock; KCRI=; BRIDGE=
# shellcheck disable=SC1091
[ -f "$STATEDIR/knode.vars" ] && source "$STATEDIR/knode.vars"
if [ -f "$STATEDIR/containerd.pid" ] && pid_alive "$(cat "$STATEDIR/containerd.pid")" && [ -S "$SOCK" ]; then
  if [ -n "$KCRI" ] && [ -x "$KCRI" ]; then
    n=$(timeout 120 "$KCRI" -e "unix://$SOCK" -t 60s rmp-all 2>&1 | tee -a "$STATEDIR/logs/stop.log" | grep -c '^rmp-all ' || true)
    log "removed $n pod sandbox(es)"
  else
    log "WARNING: knode-cri not found; pod sandboxes not torn down via CNI"
  fi
fi
stop_pid "$STATEDIR/containerd.pid" 10 containerd

# ---- leftovers of containerd's runtime v2 (tasks + shims outlive containerd by design)
TASKS=$STATEDIR/containerd/state/io.containerd.runtime.v2.task
if [ -d "$TASKS" ]; then
  for f in "$TASKS"/*/*/init.pid; do
    [ -f "$f" ] || continue; p=$(cat "$f")
    pid_alive "$p" && grep -q kubepods "/proc/$p/cgroup" 2>/dev/null && { kill -KILL "$p"; log "killed container init $p ($f)"; }
  done
fi
# (containerd 1.6 writes no shim.pid; shims still alive are found by the namespace check below)

# ---- mount namespace: end the holder, then check nothing else lives in the namespace
NS=$(cat "$STATEDIR/mntns" 2>/dev/null || true)
stop_pid "$STATEDIR/nsholder.pid" 2 sleep
if [ -n "$NS" ]; then
  for _ in 1 2 3; do
    left=()
    for d in /proc/[0-9]*; do
      [ "$(readlink "$d/ns/mnt" 2>/dev/null)" = "$NS" ] && left+=("${d#/proc/}")
    done
    [ ${#left[@]} -eq 0 ] && break
    log "killing leftover processes in the node's mount namespace: ${left[*]}"
    kill -KILL "${left[@]}" 2>/dev/null; sleep 0.5
  done
fi

# ---- network: bridge + stray veths, iptables chains
if [ -n "$BRIDGE" ] && ip link show "$BRIDGE" >/dev/null 2>&1; then
  for _ in $(seq 1 20); do   # netns teardown is asynchronous: veths vanish shortly
    [ -z "$(ip -o link show master "$BRIDGE" 2>/dev/null)" ] && break; sleep 0.1
  done
  for v in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$v" 2>/dev/null && log "deleted stray $v"
  done
  if [ -f "$STATEDIR/bridge.created" ]; then ip link del "$BRIDGE" && log "deleted bridge $BRIDGE"; rm -f "$STATEDIR/bridge.created"; fi
fi
clean_ipt() {  # drop chains KUBE-*/CNI-* and every rule jumping to them; other rules untouched
  local ipt=$1 t dump
  command -v "$ipt-save" >/dev/null || return 0
  for t in filter nat mangle; do
    dump=$("$ipt-save" -t "$t" 2>/dev/null) || continue
    grep -Eq '^:(KUBE|CNI)-|-[jg] (KUBE|CNI)-' <<<"$dump" || continue
    grep -Ev '^:(KUBE|CNI)-|^-A (KUBE|CNI)-|-[jg] (KUBE|CNI)-' <<<"$dump" | "$ipt-restore" -w 2>/dev/null \
      && log "$ipt: removed KUBE-*/CNI-* chains from table $t" || log "WARNING: $ipt-restore -t $t failed"
  done
}
clean_ipt iptables; clean_ipt ip6tables
# tables that did not exist before start-node.sh and are now empty: delete them (nf_tables backend + nft only)
if [ -f "$STATEDIR/iptables-tables.before" ]; then
  for x in iptables ip6tables; do
    command -v nft >/dev/null && "$x" -V 2>/dev/null | grep -q nf_tables || continue
    fam=ip; [ "$x" = ip6tables ] && fam=ip6
    for t in $("$x-save" 2>/dev/null | sed -n 's/^\*//p'); do
      grep -qx "$x $t" "$STATEDIR/iptables-tables.before" && continue
      "$x-save" -t "$t" 2>/dev/null | grep -q '^-A ' && continue
      nft delete table "$fam" "$t" 2>/dev/null && log "$x: deleted empty table $t"
    done
  done
  rm -f "$STATEDIR/iptables-tables.before"
fi

# ---- cgroups created by kubelet (cgroupfs driver, cgroup v1 + v2)
for h in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do
  [ -d "$h" ] || continue
  find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null
  [ -d "$h" ] && log "WARNING: could not remove cgroup $h" || true
done

# ---- sysctls back to their saved values
if [ -f "$STATEDIR/sysctl.saved" ]; then
  while read -r k v; do [ -f "/proc/sys/$k" ] && echo "$v" > "/proc/sys/$k" 2>/dev/null; done < "$STATEDIR/sysctl.saved"
  rm -f "$STATEDIR/sysctl.saved"; log "restored sysctls"
fi
# ---- host dirs start-node.sh created (empty on the host: only bind-mounted in the namespace)
if [ -f "$STATEDIR/hostdirs.created" ]; then
  while read -r d; do [ -n "$d" ] && rmdir "$d" 2>/dev/null; done < "$STATEDIR/hostdirs.created"
  rm -f "$STATEDIR/hostdirs.created"
fi
if mount | grep -q " $STATEDIR"; then log "WARNING: mounts left under $STATEDIR:"; mount | grep " $STATEDIR" >&2; fi
if [ "$MODE" = --purge ]; then rm -rf "$STATEDIR" && log "removed $STATEDIR"; fi
exit 0
