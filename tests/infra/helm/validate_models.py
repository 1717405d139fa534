#!/usr/bin/env python3
"""Validate the Argo CD, Flux and Prometheus Operator objects of manifests, offline.

kubernetes-validate only warns about custom kinds, and validate_crs.py needs the CRD. For these
third-party kinds the @kubernetes-models validators (installed by install-checkers.sh) are used:
types, required fields, enums and patterns (they do not refuse unknown fields).

usage: validate_models.py MODELS_DIR MANIFEST.yaml|- ...
exit: 0 all such objects valid (or none found), 1 invalid, 2 usage/parse error or no model.
Objects of other groups are left out (built-ins: kubernetes-validate; BackupMx: validate_crs.py).
"""
import json, pathlib, re, subprocess, sys
import yaml

GROUPS = re.compile(r"^(argoproj\.io|[a-z]+\.toolkit\.fluxcd\.io|monitoring\.coreos\.com)/")


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    models = pathlib.Path(sys.argv[1])
    items = []
    for f in sys.argv[2:]:
        text = sys.stdin.read() if f == "-" else pathlib.Path(f).read_text()
        try:
            docs = [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as e:
            print(f"ERROR {f}: {e}")
            return 2
        items += [{"file": f, "doc": d} for d in docs if GROUPS.match(str(d.get("apiVersion", "")))]
    if not items:
        print("INFO no Argo CD, Flux or Prometheus Operator objects")
        return 0
    r = subprocess.run(["node", str(models / "validate_models.mjs")], cwd=models,
                       input=json.dumps(items), text=True)
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
