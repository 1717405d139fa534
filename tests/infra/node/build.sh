#!/bin/bash
# build.sh - build the node half of the real-node test tier: kubelet and kube-proxy v1.20.2 from
# Debian bookworm's `kubernetes` SOURCE package (offline: vendored deps, GOPROXY=off, Debian's
# Go 1.19), exactly like tests/infra/kube/build.sh builds the control plane, plus knode-cri
# (knode-cri/main.go: a ~100-line CRI client built inside the same tree; bookworm has no
# crictl), which stop.sh uses to tear pod sandboxes down through CNI.
#
#   build.sh [OUTDIR [COMPONENT...]]
#     OUTDIR     default ${BACKUPMX_KUBE_BIN:-$HOME/.cache/backupmx/kube-1.20/bin}: the same
#                directory as the control plane, so one KUBE_BIN_DIR serves both
#     COMPONENT  any of kubelet kube-proxy knode-cri (default: all three)
#
# Idempotent: every component whose OUTDIR/<component> exists is skipped; when all exist, it
# exits at once and touches nothing (no apt, no network).
#
# env:
#   BACKUPMX_KUBE_BIN  default OUTDIR
#   KUBE_BUILD_DIR     source tree + Go build cache; default OUTDIR/.build, which is the build
#                      dir tests/infra/kube/build.sh keeps: the unpacked, patched source and the
#                      Go cache are shared (same layout, same patch marker), so after a control
#                      plane build the node build is incremental
#   KUBE_KEEP_BUILD    1 (default) keeps KUBE_BUILD_DIR; 0 deletes it afterwards
#   KUBE_SRC_SUITE     Debian suite whose source package is used (default bookworm)
#   KUBE_APT_URI       archive URI for the deb-src entry (default: the machine's own `deb` entry)
#
# The two build scripts take the same lock (OUTDIR/.build.lock): they never share the build
# dir at the same time. Needs root (apt-get) when something is to be built. Network: the Debian
# archive only. Cold (nothing cached) ~3-4 min on 2 cores; see README.md for measured times.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/infra/kube/build-lib.sh
. "$HERE/../kube/build-lib.sh"
DEFAULT_OUTDIR=${BACKUPMX_KUBE_BIN:-${HOME:-/root}/.cache/backupmx/kube-1.20/bin}
OUTDIR=${1:-$DEFAULT_OUTDIR}
shift || true
COMPONENTS=("$@")
[ ${#COMPONENTS[@]} -eq 0 ] && COMPONENTS=(kubelet kube-proxy knode-cri)

T0=$(date +%s)
log() { printf '[node-build +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { printf '[node-build] ERROR: %s\n' "$*" >&2; exit 1; }

for c in "${COMPONENTS[@]}"; do
  case $c in
    kubelet | kube-proxy | knode-cri) ;;
    *) printf '[node-build] ERROR: unsupported component: %s\n' "$c" >&2; exit 2 ;;
  esac
done
kb_todo
kb_prepare
kb_toolchain
kb_source
kb_go_env
# knode-cri is built inside the same tree (it uses the vendored CRI API and gRPC)
mkdir -p cmd/knode-cri
cp "$HERE/knode-cri/main.go" cmd/knode-cri/main.go
kb_go_build
kb_finish kubelet
