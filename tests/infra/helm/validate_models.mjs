// validate_models.mjs - validates Argo CD, Flux and Prometheus Operator objects with the
// @kubernetes-models validators (install-checkers.sh copies this file next to their node_modules).
// Input on stdin: a JSON array of {file, doc}. Prints one line per object; exit 1 when one is
// invalid, 2 when a kind has no model. Run through validate_models.py, which reads the YAML.
import { readFileSync } from "node:fs";

const PACKAGES = [
  [/^argoproj\.io$/, "@kubernetes-models/argo-cd"],
  [/\.toolkit\.fluxcd\.io$/, "@kubernetes-models/flux-cd"],
  [/^monitoring\.coreos\.com$/, "@kubernetes-models/prometheus-operator"],
];

const items = JSON.parse(readFileSync(0, "utf8"));
let rc = 0;
for (const { file, doc } of items) {
  const [group, version] = doc.apiVersion.split("/");
  const pkg = PACKAGES.find(([re]) => re.test(group))?.[1];
  const what = `${file} ${doc.kind}/${doc.metadata?.name ?? "?"} (${doc.apiVersion})`;
  let Model;
  try {
    Model = (await import(`${pkg}/${group}/${version}/${doc.kind}`))[doc.kind];
  } catch (e) {
    console.log(`ERROR ${what}: no model for this kind (${e.message.split("\n")[0]})`);
    rc = 2;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`INFO ${what} valid`);
  } catch (e) {
    console.log(`ERROR ${what}: ${e.message}`);
    rc = Math.max(rc, 1);
  }
}
process.exit(rc);
