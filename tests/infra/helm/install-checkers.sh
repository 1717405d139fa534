#!/usr/bin/env bash
# install-checkers.sh - the checkers the chart tests use beside helm and kubernetes-validate
# (install.sh), into the same place (default ${BACKUPMX_HELM_BIN:-$HOME/.cache/backupmx/helm/bin}):
#
#   promtool   Prometheus' rule checker and rule unit tester, from Debian's `prometheus` package:
#              the .deb is fetched with `apt-get download` and only usr/bin/promtool is unpacked
#              (nothing is installed, so no Prometheus daemon is set up or started).
#   models/    the @kubernetes-models npm packages of Argo CD, Flux and the Prometheus Operator
#              (`npm install`, pinned versions): their validators check the Application,
#              HelmRelease, Kustomization, GitRepository, HelmRepository, ServiceMonitor and
#              PrometheusRule objects of examples/ and of the chart (types, required fields, enums,
#              patterns; these models do not refuse unknown fields). validate_models.py runs them.
#
# usage: install-checkers.sh [DIR]
# Idempotent: returns at once when promtool runs and the pinned model versions are installed.
set -euo pipefail
DIR="${1:-${BACKUPMX_HELM_BIN:-$HOME/.cache/backupmx/helm/bin}}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
MODELS="$(dirname "$DIR")/models"
log() { printf '[install-checkers] %s\n' "$*"; }

# --- promtool ----------------------------------------------------------------------------------
if "$DIR/promtool" --version > /dev/null 2>&1; then
  log "promtool present: $("$DIR/promtool" --version 2>&1 | head -1)"
else
  command -v apt-get > /dev/null || { echo "[install-checkers] ERROR: apt-get is needed for promtool" >&2; exit 1; }
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  chmod 755 "$TMP" # apt's _apt user downloads into it
  log "apt-get download prometheus (promtool only is unpacked) ..."
  if ! (cd "$TMP" && apt-get download -q prometheus > /dev/null 2>&1); then
    log "apt-get update (no package list had prometheus)"
    apt-get update -q > /dev/null
    (cd "$TMP" && apt-get download -q prometheus)
  fi
  DEB="$(ls "$TMP"/prometheus_*.deb)"
  dpkg-deb --fsys-tarfile "$DEB" | tar -x -C "$TMP" ./usr/bin/promtool
  install -m 0755 "$TMP/usr/bin/promtool" "$DIR/promtool"
  "$DIR/promtool" --version > /dev/null 2>&1 || { echo "[install-checkers] ERROR: $DIR/promtool does not run" >&2; exit 1; }
  log "installed $DIR/promtool: $("$DIR/promtool" --version 2>&1 | head -1) (from $(basename "$DEB"))"
fi

# --- @kubernetes-models ------------------------------------------------------------------------
PKGS=("@kubernetes-models/argo-cd@4.0.0" "@kubernetes-models/flux-cd@4.0.0" "@kubernetes-models/prometheus-operator@6.0.0")
have_models() {
  local p name version
  for p in "${PKGS[@]}"; do
    name="${p%@*}" version="${p##*@}"
    [ "$(node -p "require('$MODELS/node_modules/$name/package.json').version" 2> /dev/null)" = "$version" ] || return 1
  done
}
if ! command -v node > /dev/null || ! command -v npm > /dev/null; then
  log "node/npm missing: apt-get install nodejs npm"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm > /dev/null ||
    { apt-get update -q > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm > /dev/null; }
fi
command -v node > /dev/null && command -v npm > /dev/null ||
  { echo "[install-checkers] ERROR: node and npm are needed (apt-get install nodejs npm)" >&2; exit 1; }
if have_models; then
  log "models present in $MODELS: ${PKGS[*]}"
else
  log "npm install ${PKGS[*]} into $MODELS ..."
  mkdir -p "$MODELS"
  npm install --silent --no-audit --no-fund --ignore-scripts --prefix "$MODELS" "${PKGS[@]}"
  have_models || { echo "[install-checkers] ERROR: the models did not install in $MODELS" >&2; exit 1; }
  log "installed in $MODELS: ${PKGS[*]}"
fi
cp "$(dirname "$0")/validate_models.mjs" "$MODELS/validate_models.mjs"
