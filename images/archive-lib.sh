#!/bin/bash
# archive-lib.sh - the docker-archive writer shared by images/make-image.sh and
# tests/infra/node/make-pause-image.sh. Source it; it does nothing by itself.

# docker_archive W LSHA REF OUT CFG [TAR_OPTION...]: both image scripts pack the same layout, so
# one writer: W/layer.tar (sha256 LSHA) and the config JSON CFG become OUT, a docker-archive
# tarball tagged REF (manifest.json, repositories; fixed owner, mtime and order, with the extra
# TAR_OPTIONs, e.g. --format=gnu). Sets CSHA, the config's sha256.
docker_archive() {
  local w=$1 lsha=$2 ref=$3 out=$4 cfg=$5 a
  shift 5
  printf '%s' "$cfg" > "$w/config.json"
  CSHA=$(sha256sum "$w/config.json" | cut -d' ' -f1)
  a=$w/archive
  mkdir -p "$a/$lsha"
  mv "$w/layer.tar" "$a/$lsha/layer.tar"
  mv "$w/config.json" "$a/$CSHA.json"
  printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["%s/layer.tar"]}]' "$CSHA" "$ref" "$lsha" > "$a/manifest.json"
  printf '{"%s":{"%s":"%s"}}' "${ref%:*}" "${ref##*:}" "$lsha" > "$a/repositories"
  mkdir -p "$(dirname "$out")"
  tar "$@" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$a" -cf "$out.tmp" .
  mv "$out.tmp" "$out"
}
