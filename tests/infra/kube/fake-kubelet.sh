#!/bin/bash
# fake-kubelet.sh - play the kubelet (there is none in the kube test tier): fake Nodes and Pod
# status, through the API with the admin token (see README.md, "Faking the kubelet").
#
# usage: fake-kubelet.sh STATEDIR node NODE              create/refresh a Ready Node (heartbeat now)
#        fake-kubelet.sh STATEDIR ready NS/POD [IP]      bind to a node if unscheduled, then
#                                                      status Running + Ready (+podIP)
#        fake-kubelet.sh STATEDIR notready NS/POD        Ready=False (pod keeps running)
#        fake-kubelet.sh STATEDIR delete NS/POD          force delete (grace 0): a pod bound to a
#                                                      node never finishes graceful deletion here
# env: FAKE_NODE (default fake-node) = node used for binding in `ready`.
# Uses STATEDIR/env from start.sh (curl for status: kubectl 1.20 has no --subresource).
set -euo pipefail
STATEDIR=${1:?usage: fake-kubelet.sh STATEDIR node|ready|notready|delete ARG [IP]}
CMD=${2:?}; ARG=${3:?}
# shellcheck disable=SC1091
source "$STATEDIR/env"
NODE=${FAKE_NODE:-fake-node}
now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
api() {  # METHOD PATH [BODY] [CONTENT-TYPE]
  local out code
  out=$(mktemp)
  code=$(curl -sS -o "$out" -w '%{http_code}' --cacert "$KUBE_CA" -H "Authorization: Bearer $KUBE_TOKEN" \
    -H "Content-Type: ${4:-application/merge-patch+json}" -X "$1" "$KUBE_API_URL$2" ${3:+-d "$3"})
  if [ "${code:0:1}" != 2 ]; then echo "[fake-kubelet] $1 $2 -> HTTP $code: $(head -c 400 "$out")" >&2; rm -f "$out"; return 1; fi
  rm -f "$out"
}
node_ready() {  # NODE
  local n=$1 t; t=$(now)
  if ! api GET "/api/v1/nodes/$n" 2>/dev/null; then
    api POST /api/v1/nodes "{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"$n\",\"labels\":{\"kubernetes.io/hostname\":\"$n\",\"kubernetes.io/os\":\"linux\",\"kubernetes.io/arch\":\"amd64\"}}}" application/json
    # the TaintNodesByCondition admission plugin adds node.kubernetes.io/not-ready:NoSchedule
    # on create; normally the nodelifecycle controller lifts it, which start.sh disables
    api PATCH "/api/v1/nodes/$n" '{"spec":{"taints":null}}'
  fi
  api PATCH "/api/v1/nodes/$n/status" "{\"status\":{\"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",\"lastHeartbeatTime\":\"$t\",\"lastTransitionTime\":\"$t\"}],\"addresses\":[{\"type\":\"InternalIP\",\"address\":\"127.0.0.1\"},{\"type\":\"Hostname\",\"address\":\"$n\"}],\"capacity\":{\"cpu\":\"64\",\"memory\":\"256Gi\",\"pods\":\"500\"},\"allocatable\":{\"cpu\":\"64\",\"memory\":\"256Gi\",\"pods\":\"500\"},\"nodeInfo\":{\"kubeletVersion\":\"v1.20.2\",\"architecture\":\"amd64\",\"operatingSystem\":\"linux\",\"containerRuntimeVersion\":\"fake://1\",\"kernelVersion\":\"\",\"osImage\":\"\",\"kubeProxyVersion\":\"\",\"machineID\":\"\",\"systemUUID\":\"\",\"bootID\":\"\"}}}"
}
case $CMD in
  node) node_ready "$ARG"; echo "node/$ARG Ready" ;;
  ready|notready)
    NS=${ARG%%/*}; POD=${ARG#*/}; P=/api/v1/namespaces/$NS/pods/$POD
    NODENAME=$(kubectl get pod -n "$NS" "$POD" -o jsonpath='{.spec.nodeName}')
    if [ -z "$NODENAME" ] && [ "$CMD" = ready ]; then
      node_ready "$NODE"
      api POST "$P/binding" "{\"apiVersion\":\"v1\",\"kind\":\"Binding\",\"metadata\":{\"name\":\"$POD\"},\"target\":{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"name\":\"$NODE\"}}" application/json
    fi
    H=$(printf '%s' "$NS/$POD" | cksum | cut -d' ' -f1)
    IP=${4:-10.244.$(( H / 256 % 256 )).$(( H % 253 + 2 ))}
    R=$([ "$CMD" = ready ] && echo True || echo False); t=$(now)
    CS=$(kubectl get pod -n "$NS" "$POD" -o jsonpath='{range .spec.containers[*]}{.name}{" "}{.image}{"\n"}{end}' \
      | awk -v r="$([ "$R" = True ] && echo true || echo false)" -v t="$t" 'NF==2{printf "%s{\"name\":\"%s\",\"image\":\"%s\",\"imageID\":\"\",\"ready\":%s,\"restartCount\":0,\"started\":true,\"state\":{\"running\":{\"startedAt\":\"%s\"}}}", (n++?",":""), $1, $2, r, t}')
    api PATCH "$P/status" "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$IP\",\"podIPs\":[{\"ip\":\"$IP\"}],\"hostIP\":\"127.0.0.1\",\"startTime\":\"$t\",\"conditions\":[{\"type\":\"Initialized\",\"status\":\"True\",\"lastTransitionTime\":\"$t\"},{\"type\":\"PodScheduled\",\"status\":\"True\",\"lastTransitionTime\":\"$t\"},{\"type\":\"ContainersReady\",\"status\":\"$R\",\"lastTransitionTime\":\"$t\"},{\"type\":\"Ready\",\"status\":\"$R\",\"lastTransitionTime\":\"$t\"}],\"containerStatuses\":[$CS]}}"
    echo "pod/$NS/$POD Running Ready=$R podIP=$IP" ;;
  delete)
    NS=${ARG%%/*}; POD=${ARG#*/}
    api DELETE "/api/v1/namespaces/$NS/pods/$POD" '{"apiVersion":"v1","kind":"DeleteOptions","gracePeriodSeconds":0}' application/json
    echo "pod/$NS/$POD deleted" ;;
  *) echo "[fake-kubelet] ERROR: unknown command $CMD" >&2; exit 2 ;;
esac
