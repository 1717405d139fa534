#!/bin/bash
# build.sh - build the Kubernetes v1.20.2 control plane that the kube test tier runs
# (kube-apiserver, kube-controller-manager, kube-scheduler; kubectl is extracted, not compiled)
# from Debian bookworm's `kubernetes` SOURCE package, offline (GOPROXY=off, vendored deps), with
# Debian's Go 1.19. Only the Debian archive is used: no kind/k3s/envtest downloads.
#
#   build.sh [OUTDIR [COMPONENT...]]
#     OUTDIR     default ${BACKUPMX_KUBE_BIN:-$HOME/.cache/backupmx/kube-1.20/bin}
#     COMPONENT  any of kube-apiserver kube-controller-manager kube-scheduler kubectl
#                (default: all four)
#
# kubectl comes from Debian's kubernetes-client .deb (same v1.20.2), unpacked without installing
# it: /usr/bin/kubectl may belong to another package (e.g. google-cloud-cli's dispatcher).
#
# Idempotent: every component whose OUTDIR/<component> exists is skipped; when all exist, it
# exits at once and touches nothing (no apt, no network). A cold build of all four takes about
# 4 minutes on 2 cores (see tests/infra/kube/README.md).
#
# env:
#   BACKUPMX_KUBE_BIN  default OUTDIR (start.sh uses the same default for KUBE_BIN_DIR)
#   KUBE_BUILD_DIR     source tree + Go build cache (default OUTDIR/.build, ~1.7 GB)
#   KUBE_KEEP_BUILD    1 (default) keeps KUBE_BUILD_DIR so a later build is incremental
#                      (~10-40 s per binary); 0 deletes it afterwards
#   KUBE_SRC_SUITE     Debian suite whose source package is used (default bookworm)
#   KUBE_APT_URI       archive URI for the deb-src entry (default: the URI of the machine's own
#                      `deb` entry for that suite)
#
# Needs root (apt-get) when something is to be built. Adds, only if `apt-cache showsrc
# kubernetes` finds nothing, /etc/apt/sources.list.d/backupmx-kube-src.sources (deb-src of the
# same archive) and apt-installs dpkg-dev golang-go golang-github-modern-go-reflect2-dev
# golang-github-json-iterator-go-dev.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=tests/infra/kube/build-lib.sh
. "$HERE/build-lib.sh"

DEFAULT_OUTDIR=${BACKUPMX_KUBE_BIN:-${HOME:-/root}/.cache/backupmx/kube-1.20/bin}
OUTDIR=${1:-$DEFAULT_OUTDIR}
shift || true
COMPONENTS=("$@")
[ ${#COMPONENTS[@]} -eq 0 ] &&
  COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

T0=$(date +%s)
log() { printf '[kube-build +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { printf '[kube-build] ERROR: %s\n' "$*" >&2; exit 1; }

for c in "${COMPONENTS[@]}"; do
  case $c in
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl) ;;
    *) printf '[kube-build] ERROR: unsupported component: %s\n' "$c" >&2; exit 2 ;;
  esac
done
kb_todo
kb_prepare

# ---- kubectl: extract Debian's kubernetes-client package (no compile)
if [[ " ${TODO[*]} " == *" kubectl "* ]]; then
  t=$(date +%s)
  mkdir -p "$BUILD/kubectl-deb"
  (cd "$BUILD/kubectl-deb" && rm -f ./*.deb && apt-get download kubernetes-client 2> /dev/null ||
    { apt-get -o DPkg::Lock::Timeout=900 update -qq; apt-get download kubernetes-client; }) >&2
  dpkg-deb -x "$BUILD"/kubectl-deb/kubernetes-client_*.deb "$BUILD/kubectl-deb/x"
  install -m 0755 "$BUILD/kubectl-deb/x/usr/bin/kubectl" "$OUTDIR/kubectl"
  rm -rf "$BUILD/kubectl-deb"
  log "extracted $OUTDIR/kubectl from Debian kubernetes-client in $(($(date +%s) - t))s"
  NEW=()
  for c in "${TODO[@]}"; do [ "$c" = kubectl ] || NEW+=("$c"); done
  TODO=("${NEW[@]}")
  [ ${#TODO[@]} -eq 0 ] && { log "done in $(($(date +%s) - T0))s"; exit 0; }
fi

kb_toolchain
kb_source
kb_go_env

# The release tarball has all zz_generated deepcopy/conversion/defaults files but NOT
# pkg/generated/openapi/zz_generated.openapi.go (needed by kube-apiserver and
# kube-controller-manager). Generate it like Makefile.generated_files does (same dir list),
# without the rest of `make`.
OPENAPI=pkg/generated/openapi/zz_generated.openapi.go
if [ ! -s "$OPENAPI" ]; then
  t=$(date +%s)
  go build -o "$BUILD/openapi-gen" k8s.io/kubernetes/vendor/k8s.io/kube-openapi/cmd/openapi-gen
  find -H . \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune -o -type f -name '*.go' -print0 |
    xargs -0 grep -l '^// *+k8s:' | xargs grep -l '+k8s:openapi-gen=' |
    sed 's|^\./staging/src|vendor|; s|^\./||' | xargs -n1 dirname | LC_ALL=C sort -u |
    grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' |
    sed 's|^|k8s.io/kubernetes/|' > "$BUILD/openapi-dirs.txt"
  "$BUILD/openapi-gen" --logtostderr -i "$(paste -sd, "$BUILD/openapi-dirs.txt")" \
    -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$BUILD/openapi-violations.report" >&2
  [ -s "$OPENAPI" ] || die "openapi-gen did not produce $OPENAPI"
  log "generated $OPENAPI ($(wc -l < "$BUILD/openapi-dirs.txt") API dirs) in $(($(date +%s) - t))s"
fi

kb_go_build
kb_finish kube-apiserver
