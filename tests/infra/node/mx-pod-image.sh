#!/bin/bash
# mx-pod-image.sh - the mx-pod image the real-node tier runs, the fast way: the same static
# release build and the same image layout as `make images` (images/build.sh), without its second
# image build and its chroot checks (`make images` is the place that verifies the image; this is
# the test loop's incremental path).
#
#   mx-pod-image.sh [OUT.tar]      default OUT: target/images/node/mx-pod.tar
#
# 1. `cargo build --release --locked --target x86_64-unknown-linux-gnu -p mx-pod -p
#    backupmx-operator` with exactly images/build.sh's RUSTFLAGS and profile settings, so both
#    scripts share one set of artifacts: when `make images` (or this script) built the current
#    sources already, cargo has nothing to do (~1 s); after a source change it rebuilds what
#    changed. (Building mx-pod alone would unify dependency features differently and make the
#    two scripts rebuild each other's dependencies.)
# 2. The binary must be static (ldd, file), as the image has no libc.
# 3. images/make-image.sh packs it as backupmx/mx-pod:VERSION (User 65532:65532, no shell),
#    reproducibly: the same binary gives the same tarball as `make images`, byte for byte.
# Prints the tarball's path and the image reference on stdout (two lines).
#
# env: CARGO (default cargo), IMAGE_TAG (default: the workspace version). Cold (nothing built):
# several minutes on 2 cores; see tests/infra/node/README.md.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$REPO"
log() { printf '[mx-pod-image] %s\n' "$*" >&2; }
die() { printf '[mx-pod-image] ERROR: %s\n' "$*" >&2; exit 1; }

TARGET=x86_64-unknown-linux-gnu
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
[ -n "$VERSION" ] || die "no version in Cargo.toml [workspace.package]"
REF="backupmx/mx-pod:${IMAGE_TAG:-$VERSION}"
OUT=${1:-$REPO/target/images/node/mx-pod.tar}
CARGO_HOME_DIR="${CARGO_HOME:-$HOME/.cargo}"
for t in tar sha256sum ldd file; do
  command -v "$t" > /dev/null || die "$t is missing (make deps)"
done

T0=$(date +%s)
# Called from a test (cargo test), the environment holds the test crate's CARGO_PKG_NAME,
# CARGO_MANIFEST_DIR, OUT_DIR...; build scripts such as ring's declare rerun-if-env-changed on
# them, so they would make cargo rebuild the dependency tree here (and again in the next
# build from a shell). Drop them: the same artifacts serve both callers.
for v in $(compgen -e); do
  case $v in
    CARGO_PKG_* | CARGO_MANIFEST_* | CARGO_CRATE_NAME | CARGO_BIN_* | CARGO_PRIMARY_PACKAGE | \
      CARGO_TARGET_TMPDIR | CARGO_RUSTC_CURRENT_DIR | OUT_DIR) unset "$v" ;;
  esac
done
# keep in step with images/build.sh (same flags = same artifacts, no rebuild ping-pong)
export RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$REPO=/build/backupmx --remap-path-prefix=$CARGO_HOME_DIR=/cargo"
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=debuginfo
"${CARGO:-cargo}" build -q --release --locked --target "$TARGET" \
  -p mx-pod -p backupmx-operator --bin mx-pod --bin backupmx-operator >&2 ||
  die "cargo build failed"
BIN="${CARGO_TARGET_DIR:-target}/$TARGET/release/mx-pod"
[ -x "$BIN" ] || die "$BIN was not built"
ldd_out="$(ldd "$BIN" 2>&1 || true)"
case "$ldd_out" in
  *"not a dynamic executable"* | *"statically linked"*) ;;
  *) die "$BIN is dynamically linked: $ldd_out" ;;
esac
file "$BIN" | grep -q static || die "file(1) does not call $BIN static: $(file "$BIN")"

mkdir -p "$(dirname "$OUT")"
IMAGE_PORTS="2525/tcp 8025/tcp" IMAGE_VERSION="$VERSION" \
  bash images/make-image.sh "$BIN" "$REF" "$OUT.new" -- serve --config /etc/mx-pod/config/mx-pod.toml 2> /dev/null ||
  die "images/make-image.sh failed"
mv "$OUT.new" "$OUT"
log "$OUT: $REF in $(($(date +%s) - T0))s ($(du -h "$OUT" | cut -f1), sha256 $(sha256sum "$OUT" | cut -c1-16)...)"
echo "$OUT"
echo "$REF"
