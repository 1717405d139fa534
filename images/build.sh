#!/usr/bin/env bash
# build.sh - `make images`: static release binaries of mx-pod and backupmx-operator, then one
# image tarball each (docker-archive, see make-image.sh), checked before they are kept:
#
#   target/images/mx-pod.tar              backupmx/mx-pod:VERSION
#   target/images/backupmx-operator.tar   backupmx/backupmx-operator:VERSION
#
# 1. cargo build --release --locked --target x86_64-unknown-linux-gnu with
#    RUSTFLAGS='-C target-feature=+crt-static' (static-pie glibc; the musl target is not needed),
#    symbols kept, debug info dropped, build paths remapped (no /work/... in the binaries).
# 2. `ldd` must say "not a dynamic executable" or "statically linked", `file` "static".
# 3. Each image is built twice; the two tarballs must have the same sha256 (reproducible).
# 4. verify-image.sh checks each tarball without a daemon (layout, config: User 65532:65532,
#    Entrypoint, no shell) and runs the binary from the image's own root filesystem (chroot, as
#    uid 65532, no libc, no shell), including a host name lookup through static glibc's
#    getaddrinfo (files and dns).
# Every failed check stops the build with a message: nothing is skipped.
#
# env: IMAGE_REPO_PREFIX (default backupmx/), IMAGE_TAG (default: the workspace version),
#      CARGO (default cargo). Takes ~5-10 minutes cold on 2 cores (release build of both).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
log() { printf '[images] %s\n' "$*"; }
die() { printf '[images] ERROR: %s\n' "$*" >&2; exit 1; }

TARGET=x86_64-unknown-linux-gnu
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$VERSION" ] || die "no version in Cargo.toml [workspace.package]"
TAG="${IMAGE_TAG:-$VERSION}"
PREFIX="${IMAGE_REPO_PREFIX:-backupmx/}"
OUT="$REPO/target/images"
CARGO_HOME_DIR="${CARGO_HOME:-$HOME/.cargo}"
for t in tar sha256sum ldd file python3 chroot; do
  command -v "$t" > /dev/null || die "$t is missing (make deps)"
done

log "cargo build --release --target $TARGET (crt-static) -p mx-pod -p backupmx-operator"
export RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$REPO=/build/backupmx --remap-path-prefix=$CARGO_HOME_DIR=/cargo"
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo
BUILD_LOG="$(mktemp)"
trap 'rm -f "$BUILD_LOG"' EXIT
if ! "${CARGO:-cargo}" build --release --locked --target "$TARGET" \
  -p mx-pod -p backupmx-operator --bin mx-pod --bin backupmx-operator 2>&1 | tee "$BUILD_LOG"; then
  die "cargo build failed"
fi
# glibc's linker warnings about NSS functions in static binaries, if the toolchain shows them
if grep -i "statically linked applications requires at runtime" "$BUILD_LOG"; then
  log "note: the linker warned about glibc functions in a static binary (above); verify-image.sh tests host name lookups"
fi

mkdir -p "$OUT"
for name in mx-pod backupmx-operator; do
  bin="${CARGO_TARGET_DIR:-target}/$TARGET/release/$name"
  [ -x "$bin" ] || die "$bin was not built"
  ldd_out="$(ldd "$bin" 2>&1 || true)"
  case "$ldd_out" in
    *"not a dynamic executable"* | *"statically linked"*) ;;
    *) die "$bin is dynamically linked: $ldd_out" ;;
  esac
  file "$bin" | grep -q "static" || die "file(1) does not call $bin static: $(file "$bin")"
  log "$bin: $(echo "$ldd_out" | tr -d '\t') ($(du -h "$bin" | cut -f1))"

  case "$name" in
    mx-pod) cmd=(serve --config /etc/mx-pod/config/mx-pod.toml) ports="2525/tcp 8025/tcp" ;;
    backupmx-operator) cmd=(run) ports="8080/tcp" ;;
  esac
  ref="$PREFIX$name:$TAG"
  tmp="$(mktemp -d)"
  IMAGE_PORTS="$ports" IMAGE_VERSION="$VERSION" bash images/make-image.sh "$bin" "$ref" "$tmp/a.tar" -- "${cmd[@]}"
  IMAGE_PORTS="$ports" IMAGE_VERSION="$VERSION" bash images/make-image.sh "$bin" "$ref" "$tmp/b.tar" -- "${cmd[@]}"
  sa=$(sha256sum "$tmp/a.tar" | cut -d' ' -f1)
  sb=$(sha256sum "$tmp/b.tar" | cut -d' ' -f1)
  [ "$sa" = "$sb" ] || die "$name: two builds of the image differ ($sa vs $sb): not reproducible"
  log "$name: built twice, same sha256 $sa"
  bash images/verify-image.sh "$tmp/a.tar" "$name" "$ref"
  mv "$tmp/a.tar" "$OUT/$name.tar"
  rm -rf "$tmp"
done
log "done:"
for name in mx-pod backupmx-operator; do
  log "  $OUT/$name.tar  $(du -h "$OUT/$name.tar" | cut -f1)  sha256 $(sha256sum "$OUT/$name.tar" | cut -d' ' -f1)"
done
log "load with: docker load -i target/images/mx-pod.tar (or podman load, ctr -n k8s.io images import)"
