#!/bin/bash
# make-pause-image.sh - the pod sandbox ("pause") image without a registry: Kubernetes'
# build/pause/linux/pause.c (copy in this folder, Apache-2.0) compiled with gcc -static, as a
# single-layer docker-archive tarball (tar + sha256sum only) that `ctr images import` reads.
#
#   make-pause-image.sh OUT.tar [NAME:TAG]     NAME:TAG default k8s.gcr.io/pause:3.2 (the
#                                              containerd sandbox_image start.sh configures)
# Needs gcc + libc6-dev (static libc.a). Reproducible: mode, owner 0:0 and mtime 0 are fixed.
set -euo pipefail
OUT=${1:?usage: make-pause-image.sh OUT.tar [NAME:TAG]}
REF=${2:-k8s.gcr.io/pause:3.2}
HERE=$(cd "$(dirname "$0")" && pwd)
# the docker-archive writer of images/make-image.sh
# shellcheck source=images/archive-lib.sh
. "$HERE/../../../images/archive-lib.sh"
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
R=$W/rootfs
mkdir -p "$R/bin"
gcc -Os -static -Wall -DVERSION=v3.2-backupmx -o "$R/bin/pause" "$HERE/pause.c"
strip "$R/bin/pause"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$R" -cf "$W/layer.tar" .
LSHA=$(sha256sum "$W/layer.tar" | cut -d' ' -f1)
CFG="{\"architecture\":\"amd64\",\"os\":\"linux\",\"created\":\"1970-01-01T00:00:00Z\","
CFG+="\"config\":{\"Env\":[\"PATH=/bin\"],\"Entrypoint\":[\"/bin/pause\"],\"WorkingDir\":\"/\"},"
CFG+="\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$LSHA\"]},"
CFG+="\"history\":[{\"created\":\"1970-01-01T00:00:00Z\",\"created_by\":\"make-pause-image.sh\"}]}"
docker_archive "$W" "$LSHA" "$REF" "$OUT" "$CFG"
echo "$OUT: $REF (config sha256:$CSHA, $(du -h "$OUT" | cut -f1))" >&2
