#!/usr/bin/env bash
# make-image.sh - one static binary -> a single-layer image tarball in docker-archive format
# (manifest.json + config JSON + layer.tar), without a registry or a container daemon: tar and
# sha256sum only. `docker load -i`, `podman load -i`, `ctr images import` and skopeo
# (docker-archive:) read it. Adapted from the workplace recipe kube-node/make-image.sh.
#
# usage: make-image.sh BINARY NAME:TAG OUT.tar [-- CMD...]
#   BINARY   a statically linked executable, installed as /usr/local/bin/<basename>
#   NAME:TAG the image reference stored in the archive (RepoTags)
#   CMD      the image's default Cmd (arguments to the entrypoint)
# env:
#   IMAGE_PORTS="2525/tcp ..."   ExposedPorts (informational)
#   IMAGE_VERSION=0.1.0          org.opencontainers.image.version label
#   IMAGE_CA_BUNDLE=FILE         CA certificates copied to /etc/ssl/certs/ca-certificates.crt
#                                (default: the build host's Debian bundle, when present)
#
# The image: the binary, images/rootfs (/etc/passwd and /etc/group with the user `nonroot`
# 65532:65532, /etc/nsswitch.conf), the CA bundle, an empty /tmp (1777). No shell, no libc.
# Config: User 65532:65532, Entrypoint ["/usr/local/bin/<basename>"], WorkingDir /.
# Keep USER and ENTRYPOINT in step with the top-level Dockerfile (tests/tests/operator/chart.rs
# compares them).
#
# Reproducible: every file has mode, owner 0:0 and mtime 0 fixed, entries are sorted, the
# config's dates are the epoch: the same binary gives the same tarball, byte for byte.
set -euo pipefail
umask 022
usage="usage: make-image.sh BINARY NAME:TAG OUT.tar [-- CMD...]"
BIN=${1:?$usage}
REF=${2:?$usage}
OUT=${3:?$usage}
shift 3
[ "${1:-}" = -- ] && shift
CMD=("$@")
IMAGE_USER="65532:65532"
BIN_DIR="/usr/local/bin"
HERE="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=images/archive-lib.sh
. "$HERE/archive-lib.sh"
[ -x "$BIN" ] || { echo "make-image.sh: not an executable: $BIN" >&2; exit 1; }
case $REF in *:*) ;; *) echo "make-image.sh: $REF has no tag (pin one)" >&2; exit 1 ;; esac
NAME=$(basename "$BIN")
CA="${IMAGE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
R=$W/rootfs
mkdir -p "$R$BIN_DIR" "$R/etc/ssl/certs" "$R/tmp" "$R/home/nonroot"
chmod 1777 "$R/tmp"
install -m 0755 "$BIN" "$R$BIN_DIR/$NAME"
install -m 0644 "$HERE/rootfs/etc/passwd" "$HERE/rootfs/etc/group" "$HERE/rootfs/etc/nsswitch.conf" "$R/etc/"
if [ -f "$CA" ]; then
  install -m 0644 "$CA" "$R/etc/ssl/certs/ca-certificates.crt"
else
  echo "make-image.sh: warning: no CA bundle at $CA: HTTPS from the image cannot verify servers" >&2
fi

# the layer: sorted, fixed owner and mtime, GNU format (no pax atime/ctime headers)
tar --format=gnu --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 \
  -C "$R" -cf "$W/layer.tar" .
LSHA=$(sha256sum "$W/layer.tar" | cut -d' ' -f1)

json_arr() {
  local s="" x
  for x in "$@"; do x=${x//\\/\\\\}; x=${x//\"/\\\"}; s+="${s:+,}\"$x\""; done
  echo "[$s]"
}
PORTS=""
for p in ${IMAGE_PORTS:-}; do PORTS+="${PORTS:+,}\"$p\":{}"; done
ENVS=("PATH=$BIN_DIR" "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt")
CFG="{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"1970-01-01T00:00:00Z\","
CFG+="\"config\":{\"User\":\"$IMAGE_USER\",\"Env\":$(json_arr "${ENVS[@]}"),"
CFG+="\"Entrypoint\":$(json_arr "$BIN_DIR/$NAME")"
[ ${#CMD[@]} -gt 0 ] && CFG+=",\"Cmd\":$(json_arr "${CMD[@]}")"
[ -n "$PORTS" ] && CFG+=",\"ExposedPorts\":{$PORTS}"
CFG+=",\"WorkingDir\":\"/\",\"Labels\":{\"org.opencontainers.image.title\":\"$NAME\""
CFG+=",\"org.opencontainers.image.version\":\"${IMAGE_VERSION:-${REF##*:}}\""
CFG+=",\"org.opencontainers.image.licenses\":\"Apache-2.0\"}},"
CFG+="\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$LSHA\"]},"
CFG+="\"history\":[{\"created\":\"1970-01-01T00:00:00Z\",\"created_by\":\"images/make-image.sh $NAME\"}]}"
docker_archive "$W" "$LSHA" "$REF" "$OUT" "$CFG" --format=gnu
echo "make-image.sh: $OUT: $REF (config sha256:$CSHA, $(du -h "$OUT" | cut -f1))" >&2
