# shellcheck shell=bash
# build-lib.sh - the steps tests/infra/kube/build.sh (control plane) and tests/infra/node/build.sh
# (kubelet, kube-proxy, knode-cri) share: Kubernetes v1.20.2 from Debian's `kubernetes` SOURCE
# package, offline (vendored deps, GOPROXY=off), with Debian's Go 1.19. Sourced, not run.
#
# The caller sets OUTDIR and COMPONENTS (array of the binaries it may build), defines log and
# die, checks the component names, then calls, in order:
#   kb_todo          TODO = the components missing in OUTDIR; exits 0 when there are none
#   kb_prepare       root check, OUTDIR/.build.lock (both scripts take it: one build at a time
#                    per OUTDIR), TODO again under the lock, BUILD/SUITE/APT, and a deb-src entry
#                    for the `kubernetes` source package when apt has none
#   kb_toolchain     apt-installs dpkg-dev golang-go and Debian's reflect2/json-iterator
#   kb_source        SRC = the unpacked source in BUILD (once), vendor patched (once)
#   kb_go_env        ldflags (LDF) with the version, GOPATH mode, cd into the tree
#   kb_go_build      `go build` of every component in TODO into OUTDIR
#   kb_finish BIN    keeps or removes BUILD (KUBE_KEEP_BUILD), logs `BIN --version`
# env: KUBE_BUILD_DIR (default OUTDIR/.build), KUBE_KEEP_BUILD (1), KUBE_SRC_SUITE (bookworm),
# KUBE_APT_URI (default: the machine's own `deb` entry for that suite).

kb_todo() {
  TODO=()
  local c
  for c in "${COMPONENTS[@]}"; do [ -x "$OUTDIR/$c" ] || TODO+=("$c"); done
  if [ ${#TODO[@]} -eq 0 ]; then
    log "all present in $OUTDIR: ${COMPONENTS[*]}"
    exit 0
  fi
}

kb_have_src() { apt-cache showsrc kubernetes 2> /dev/null | grep -q '^Package: kubernetes'; }

kb_prepare() {
  [ "$(id -u)" = 0 ] || die "building ${TODO[*]} needs root (apt-get); run: sudo bash $0 $OUTDIR"
  mkdir -p "$OUTDIR"
  OUTDIR=$(cd "$OUTDIR" && pwd)
  # one build at a time per OUTDIR (two `make deps` at once, or both build scripts, would
  # share the build dir)
  exec 9> "$OUTDIR/.build.lock"
  if ! flock -n 9; then
    log "another build holds $OUTDIR/.build.lock; waiting for it"
    flock 9
  fi
  TODO=()
  local c
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

  # a deb-src entry providing the `kubernetes` source package
  if ! kb_have_src; then
    apt-get -o DPkg::Lock::Timeout=900 update -qq || true
  fi
  if ! kb_have_src; then
    # reuse the archive URI (and keyring) of the machine's own `deb` entry for $SUITE
    local URI=${KUBE_APT_URI:-} KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg K=
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
  kb_have_src || die "no 'kubernetes' source package available from apt (deb-src for $SUITE?)"
}

# golang-go in bookworm == Go 1.19. (On a newer Debian, install golang-1.19-go from bookworm if
# possible: k8s 1.20 is not known to build with much newer Go.)
kb_toolchain() {
  local NEED=() p
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
}

kb_source() {
  SRC=$(ls -d "$BUILD"/kubernetes-*/ 2> /dev/null | head -n1 || true)
  if [ -z "$SRC" ] || [ ! -f "$SRC/go.mod" ]; then
    log "apt-get source kubernetes (suite $SUITE)"
    (cd "$BUILD" && apt-get source -qq "kubernetes/$SUITE" 2> /dev/null || apt-get source -qq kubernetes) >&2
    SRC=$(ls -d "$BUILD"/kubernetes-*/ | head -n1)
  fi
  SRC=${SRC%/}
  log "source: $SRC"
  # swap vendored reflect2 1.0.1 / json-iterator 1.1.10 for Debian's reflect2 1.0.2 /
  # json-iterator 1.1.12 (reflect2 1.0.1 crashes at runtime with Go >= 1.18: unsafe map
  # iteration). Go's vendor check only compares go.mod with vendor/modules.txt, not file
  # hashes, so replacing the files is enough.
  if [ ! -f "$SRC/.backupmx-vendor-patched" ]; then
    local pair from to
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
}

# Like upstream's hack/lib/golang.sh for 1.20: GOPATH mode (GO111MODULE=off; module mode fails
# with "updates to go.mod needed"), tags selinux,notest, static (no cgo). Plain `go build`
# instead of `make`: the generated code is in the release tarball already.
kb_go_env() {
  local VER MAJOR MINOR pkg
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
}

kb_go_build() {
  local c t
  for c in "${TODO[@]}"; do
    t=$(date +%s)
    log "go build k8s.io/kubernetes/cmd/$c ..."
    go build -trimpath -tags selinux,notest -ldflags "$LDF" -o "$OUTDIR/$c.tmp" "k8s.io/kubernetes/cmd/$c"
    mv "$OUTDIR/$c.tmp" "$OUTDIR/$c"
    log "built $OUTDIR/$c in $(($(date +%s) - t))s ($(du -h "$OUTDIR/$c" | cut -f1))"
  done
}

kb_finish() { # kb_finish BINARY-TO-ASK-FOR-ITS-VERSION
  if [ "${KUBE_KEEP_BUILD:-1}" = 0 ]; then
    rm -rf "$BUILD"
    log "removed $BUILD"
  else
    log "build dir kept: $BUILD ($(du -sh "$BUILD" | cut -f1))"
  fi
  [ -x "$OUTDIR/$1" ] && log "$("$OUTDIR/$1" --version 2> /dev/null || true)"
  log "done in $(($(date +%s) - T0))s"
}
