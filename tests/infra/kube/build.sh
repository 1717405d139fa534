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

DEFAULT_OUTDIR=${BACKUPMX_KUBE_BIN:-${HOME:-/root}/.cache/backupmx/kube-1.20/bin}
OUTDIR=${1:-$DEFAULT_OUTDIR}
shift || true
COMPONENTS=("$@")
[ ${#COMPONENTS[@]} -eq 0 ] &&
  COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)

T0=$(date +%s)
log() { printf '[kube-build +%ss] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }
die() { printf '[kube-build] ERROR: %s\n' "$*" >&2; exit 1; }

TODO=()
for c in "${COMPONENTS[@]}"; do
  case $c in
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl) ;;
    *) printf '[kube-build] ERROR: unsupported component: %s\n' "$c" >&2; exit 2 ;;
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

# one build at a time per OUTDIR (two `make deps` at once would share the build dir)
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

# ---- 1. make sure a deb-src entry provides the `kubernetes` source package
have_src() { apt-cache showsrc kubernetes 2> /dev/null | grep -q '^Package: kubernetes'; }
if ! have_src; then
  apt-get -o DPkg::Lock::Timeout=900 update -qq || true
fi
if ! have_src; then
  # reuse the archive URI (and keyring) of the machine's own `deb` entry for $SUITE
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

# ---- 2. toolchain + replacement vendored libs
# golang-go in bookworm == Go 1.19. (On a newer Debian, install golang-1.19-go from bookworm if
# possible: k8s 1.20 is not known to build with much newer Go.)
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

# ---- 3. fetch + unpack source (once)
SRC=$(ls -d "$BUILD"/kubernetes-*/ 2> /dev/null | head -n1 || true)
if [ -z "$SRC" ] || [ ! -f "$SRC/go.mod" ]; then
  log "apt-get source kubernetes (suite $SUITE)"
  (cd "$BUILD" && apt-get source -qq "kubernetes/$SUITE" 2> /dev/null || apt-get source -qq kubernetes) >&2
  SRC=$(ls -d "$BUILD"/kubernetes-*/ | head -n1)
fi
SRC=${SRC%/}
log "source: $SRC"

# ---- 4. swap vendored reflect2 1.0.1 / json-iterator 1.1.10 for Debian's reflect2 1.0.2 /
# json-iterator 1.1.12 (reflect2 1.0.1 crashes at runtime with Go >= 1.18: unsafe map
# iteration). Go's vendor check only compares go.mod with vendor/modules.txt, not file hashes,
# so replacing the files is enough.
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

# ---- 5. build. Like upstream's hack/lib/golang.sh for 1.20: GOPATH mode (GO111MODULE=off;
# module mode fails with "updates to go.mod needed"), tags selinux,notest. Plain `go build`
# instead of `make`: the generated code is already in the release tarball, so make's codegen
# step is not needed (except the one file generated below).
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
[ -x "$OUTDIR/kube-apiserver" ] && log "$("$OUTDIR/kube-apiserver" --version 2> /dev/null || true)"
log "done in $(($(date +%s) - T0))s"
