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
DEFAULT_OUTDIR=${BACKUPMX_KUBE_BIN:-${HOME:-/root}/.cache/backupmx/kube-1.20/bin}
OUTDIR=${1:-$DEFAULT_OUTDIR}
shift || true
COMPONENTS=("$@")
[ ${#COMPONENTS[@]} -eq 0 ] && COMPONENTS=(kubelet kube-proxy knode-cri)

T0=$(date +%s)
log() { printf '[node-build +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { printf '[node-build] ERROR: %s\n' "$*" >&2; exit 1; }

TODO=()
for c in "${COMPONENTS[@]}"; do
  case $c in
    kubelet | kube-proxy | knode-cri) ;;
    *) printf '[node-build] ERROR: unsupported component: %s\n' "$c" >&2; exit 2 ;;
  esac
  [ -x "$OUTDIR/$c" ] || TODO+=("$c")
done
if [ ${#TODO[@]} -eq 0 ]; then
  log "all present in $OUTDIR: ${COMPONENTS[*]}"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "building ${TODO[*]} needs root (apt-get); run: sudo bash $0 $OUTDIR"
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

# one build at a time per OUTDIR (the control plane's build.sh takes the same lock)
exec 9> "$OUTDIR/.build.lock"
if ! flock -n 9; then
  log "another build holds $OUTDIR/.build.lock; waiting for it"
  flock 9
fi
TODO=()
for c in "${COMPONENTS[@]}"; do
  if [ -x "$OUTDIR/$c" ]; then log "$OUTDIR/$c exists, skipping"; else TODO+=("$c"); fi
done
[ ${#TODO[@]} -eq 0 ] && { log "nothing to do"; exit 0; }
log "building ${TODO[*]} into $OUTDIR"

BUILD=${KUBE_BUILD_DIR:-$OUTDIR/.build}
SUITE=${KUBE_SRC_SUITE:-bookworm}
mkdir -p "$BUILD"
BUILD=$(cd "$BUILD" && pwd)

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -o DPkg::Lock::Timeout=900 -y --no-install-recommends)

# ---- 1. a deb-src entry providing the `kubernetes` source package (as in ../kube/build.sh)
have_src() { apt-cache showsrc kubernetes 2> /dev/null | grep -q '^Package: kubernetes'; }
if ! have_src; then
  apt-get -o DPkg::Lock::Timeout=900 update -qq || true
fi
if ! have_src; then
  URI=${KUBE_APT_URI:-}
  KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
  K=
  if [ -z "$URI" ]; then
    read -r URI K < <(awk -v s="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
      { u = ""; k = ""; m = 0; t = 0
        for (i = 1; i <= NF; i++) {
          n = split($i, a, /[ \t]+/)
          if (a[1] == "URIs:") u = a[2]
          else if (a[1] == "Signed-By:") k = a[2]
          else if (a[1] == "Types:") { for (j = 2; j <= n; j++) if (a[j] == "deb") t = 1 }
          else if (a[1] == "Suites:") { for (j = 2; j <= n; j++) if (a[j] == s) m = 1 }
        }
        if (t && m && u != "") { print u, k; exit } }' /etc/apt/sources.list.d/*.sources 2> /dev/null) || true
    [ -n "${K:-}" ] && KEYRING=$K
  fi
  if [ -z "$URI" ]; then
    URI=$(sed -e 's/\[[^]]*\]//' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2> /dev/null |
      awk -v s="$SUITE" '$1=="deb" && $3==s {print $2; exit}') || true
  fi
  [ -n "$URI" ] || die "no 'deb' entry for suite $SUITE found in /etc/apt; set KUBE_APT_URI"
  # the same file name as ../kube/build.sh: one entry, whichever script adds it
  log "adding deb-src $URI $SUITE (/etc/apt/sources.list.d/backupmx-kube-src.sources)"
  cat > /etc/apt/sources.list.d/backupmx-kube-src.sources << EOF
Types: deb-src
URIs: $URI
Suites: $SUITE
Components: main
Signed-By: $KEYRING
EOF
  apt-get -o DPkg::Lock::Timeout=900 update -qq
fi
have_src || die "no 'kubernetes' source package available from apt (deb-src for $SUITE?)"

# ---- 2. toolchain (bookworm golang-go = Go 1.19) + the replacement vendored libs
NEED=()
for p in dpkg-dev golang-go golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev; do
  dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q 'ok installed' || NEED+=("$p")
done
if [ ${#NEED[@]} -gt 0 ]; then
  log "apt-get install ${NEED[*]}"
  "${APT[@]}" install "${NEED[@]}" > /dev/null || {
    apt-get -o DPkg::Lock::Timeout=900 update -qq
    "${APT[@]}" install "${NEED[@]}" > /dev/null
  }
fi
export PATH=/usr/lib/go/bin:$PATH
log "$(go version)"

# ---- 3. source (once; shared with ../kube/build.sh through the build dir)
SRC=$(ls -d "$BUILD"/kubernetes-*/ 2> /dev/null | head -n1 || true)
if [ -z "$SRC" ] || [ ! -f "$SRC/go.mod" ]; then
  log "apt-get source kubernetes (suite $SUITE)"
  (cd "$BUILD" && apt-get source -qq "kubernetes/$SUITE" 2> /dev/null || apt-get source -qq kubernetes) >&2
  SRC=$(ls -d "$BUILD"/kubernetes-*/ | head -n1)
fi
SRC=${SRC%/}
log "source: $SRC"

# ---- 4. reflect2 1.0.1 crashes with Go >= 1.18: Debian's reflect2 1.0.2 / json-iterator 1.1.12
# (same marker file as ../kube/build.sh, so the tree is patched once for both)
if [ ! -f "$SRC/.backupmx-vendor-patched" ]; then
  for pair in "modern-go/reflect2" "json-iterator/go"; do
    from=/usr/share/gocode/src/github.com/$pair
    to=$SRC/vendor/github.com/$pair
    [ -d "$from" ] || die "missing $from (package golang-github-${pair//\//-}-dev?)"
    find "$to" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
    find "$from" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
      -exec cp {} "$to/" \;
  done
  touch "$SRC/.backupmx-vendor-patched"
  log "patched vendor/github.com/{modern-go/reflect2,json-iterator/go}"
fi

# ---- 5. build: GOPATH mode like upstream's hack/lib/golang.sh for 1.20, static, no cgo
VER=$(sed -n 's/^Version: *\([0-9.]*+really\)\{0,1\}\([0-9.]*\).*/\2/p' <(apt-cache showsrc kubernetes) | head -n1)
VER=${VER:-1.20.2}
MAJOR=${VER%%.*}
MINOR=${VER#*.}
MINOR=${MINOR%%.*}
LDF="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  pkg=k8s.io/kubernetes/vendor/$pkg
  LDF+=" -X $pkg.gitVersion=v$VER -X $pkg.gitMajor=$MAJOR -X $pkg.gitMinor=$MINOR"
  LDF+=" -X $pkg.gitTreeState=clean -X $pkg.gitCommit=debian-$SUITE-source"
  LDF+=" -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
done
export GOPATH=$BUILD/gopath GOCACHE=$BUILD/gocache
export GO111MODULE=off GOPROXY=off GOFLAGS='' CGO_ENABLED=0 HOME=${HOME:-/root}
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn "$SRC" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
mkdir -p cmd/knode-cri
cp "$HERE/knode-cri/main.go" cmd/knode-cri/main.go
for c in "${TODO[@]}"; do
  t=$(date +%s)
  log "go build k8s.io/kubernetes/cmd/$c ..."
  go build -trimpath -tags selinux,notest -ldflags "$LDF" -o "$OUTDIR/$c.tmp" "k8s.io/kubernetes/cmd/$c"
  mv "$OUTDIR/$c.tmp" "$OUTDIR/$c"
  log "built $OUTDIR/$c in $(($(date +%s) - t))s ($(du -h "$OUTDIR/$c" | cut -f1))"
done

if [ "${KUBE_KEEP_BUILD:-1}" = 0 ]; then
  rm -rf "$BUILD"
  log "removed $BUILD"
else
  log "build dir kept: $BUILD ($(du -sh "$BUILD" | cut -f1))"
fi
[ -x "$OUTDIR/kubelet" ] && log "$("$OUTDIR/kubelet" --version 2> /dev/null || true)"
log "done in $(($(date +%s) - T0))s"
