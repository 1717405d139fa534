//! The Helm chart `charts/backupmx-operator`, with real tools: helm (lint, schema, template),
//! kubernetes-validate and validate_crs.py (every rendered manifest and every file of
//! `examples/`), the Argo CD / Flux / Prometheus Operator models, promtool (the alerts, with
//! unit tests), and the real v1.20 API server: the rendered chart is applied, then the operator
//! runs with the chart's ServiceAccount token (TokenRequest) and the Deployment's own flags and
//! must reconcile an example fully; with RBAC for another namespace only, it must be refused.
//!
//! The tools come from `make deps` (tests/infra/helm/install.sh and install-checkers.sh, under
//! `${BACKUPMX_HELM_BIN:-~/.cache/backupmx/helm/bin}`); a missing one fails the test.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::Duration,
};

use backupmx_tests::{
    kube::{EXAMPLE_OBJECTS, Operator, cluster, condition, eventually, start_operator_as, text},
    repo,
};
use serde_json::{Value, json};

// === tools ===

struct Tools {
    helm: PathBuf,
    kubernetes_validate: PathBuf,
    /// python of the kubernetes-validate venv (jsonschema, pyyaml)
    python: PathBuf,
    promtool: PathBuf,
    /// kubectl v1.37 of install.sh: only for `kubectl kustomize` (offline)
    kubectl_new: PathBuf,
    models: PathBuf,
    /// HELM_CACHE_HOME etc. (so tests never write to ~/.cache/helm)
    helm_home: tempfile::TempDir,
}

fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let bin = std::env::var("BACKUPMX_HELM_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                    .join(".cache/backupmx/helm/bin")
            });
        let models = bin.parent().unwrap().join("models");
        for (path, by) in [
            (bin.join("helm"), "install.sh"),
            (bin.join("kubectl"), "install.sh"),
            (bin.join("kubernetes-validate"), "install.sh"),
            (bin.join("kv-python"), "install.sh"),
            (bin.join("promtool"), "install-checkers.sh"),
            (models.join("validate_models.mjs"), "install-checkers.sh"),
        ] {
            assert!(
                path.exists(),
                "{} is missing: run `make deps` (tests/infra/helm/{by})",
                path.display()
            );
        }
        Tools {
            helm: bin.join("helm"),
            kubernetes_validate: bin.join("kubernetes-validate"),
            python: bin.join("kv-python"),
            promtool: bin.join("promtool"),
            kubectl_new: bin.join("kubectl"),
            models,
            helm_home: tempfile::tempdir().unwrap(),
        }
    })
}

fn chart() -> PathBuf {
    repo().join("charts/backupmx-operator")
}

fn out_text(out: &Output) -> String {
    text(out)
}

/// Runs helm offline with its state in a temp dir.
fn helm(args: &[&str]) -> Output {
    let t = tools();
    let home = t.helm_home.path();
    Command::new(&t.helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", "/dev/null")
        .output()
        .expect("run helm")
}

/// `helm template RELEASE charts/backupmx-operator -n NAMESPACE ARGS...`, which must succeed.
fn render(release: &str, namespace: &str, args: &[&str]) -> String {
    let chart = chart();
    let mut all = vec![
        "template",
        release,
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
    ];
    all.extend_from_slice(args);
    let out = helm(&all);
    assert!(
        out.status.success(),
        "helm {all:?} failed:\n{}",
        out_text(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The YAML documents of `yaml` as JSON (parsed by PyYAML, as kubectl's YAML 1.1 would).
fn docs(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(&tools().python)
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python (kubernetes-validate's venv)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "YAML parse: {}", out_text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn kind_name(d: &Value) -> String {
    format!(
        "{}/{}",
        d["kind"].as_str().unwrap_or("?"),
        d["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// Writes `content` to a new temp file and returns it (kept alive by the TempDir).
fn temp_file(dir: &tempfile::TempDir, name: &str, content: &str) -> PathBuf {
    let p = dir.path().join(name);
    fs::write(&p, content).unwrap();
    p
}

/// kubernetes-validate --strict against the 1.25 and 1.37 schemas (the range it ships; 1.20 is
/// checked by the real API server below).
fn kubernetes_validate(file: &Path) {
    let out = Command::new(&tools().kubernetes_validate)
        .args(["--strict", "--quiet", "-k", "1.25", "-k", "1.37"])
        .arg(file)
        .output()
        .unwrap();
    let t = out_text(&out);
    assert!(
        out.status.success() && !t.contains("ERROR"),
        "kubernetes-validate {}: {t}",
        file.display()
    );
}

/// validate_crs.py --strict against crds/: BackupMx objects checked against the CRD's schema.
fn validate_crs(files: &[PathBuf]) -> String {
    let out = Command::new(&tools().python)
        .arg(repo().join("tests/infra/helm/validate_crs.py"))
        .args(["--strict", "--crds"])
        .arg(repo().join("crds"))
        .args(files)
        .output()
        .unwrap();
    let t = out_text(&out);
    assert!(out.status.success(), "validate_crs.py: {t}");
    t
}

/// validate_models.py: Argo CD, Flux and Prometheus Operator objects against their models.
fn validate_models(files: &[PathBuf]) -> String {
    let out = Command::new(&tools().python)
        .arg(repo().join("tests/infra/helm/validate_models.py"))
        .arg(&tools().models)
        .args(files)
        .output()
        .unwrap();
    let t = out_text(&out);
    assert!(out.status.success(), "validate_models.py: {t}");
    t
}

// === offline: the chart's files ===

#[test]
fn chart_crd_is_byte_identical_to_crds_backupmx_yaml() {
    let generated = fs::read(repo().join("crds/backupmx.yaml")).unwrap();
    let in_chart = fs::read(chart().join("crds/backupmx.yaml")).unwrap();
    assert!(
        generated == in_chart,
        "charts/backupmx-operator/crds/backupmx.yaml differs from crds/backupmx.yaml: run `make crds`"
    );
    let files: Vec<_> = fs::read_dir(chart().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, ["backupmx.yaml"], "only the one CRD in crds/");
}

#[test]
fn helm_lint_strict_passes_with_default_all_and_namespace_scope_values() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let all_values = format!("{chart}/ci/all-values.yaml");
    let ns_values = format!("{chart}/ci/namespace-scope-values.yaml");
    for args in [
        vec!["lint", "--strict", chart],
        vec!["lint", "--strict", chart, "-f", &all_values],
        vec!["lint", "--strict", chart, "-f", &ns_values],
        vec!["lint", "--strict", chart, "--kube-version", "1.20.0"],
    ] {
        let out = helm(&args);
        let t = out_text(&out);
        assert!(
            out.status.success() && t.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm {args:?}:\n{t}"
        );
        assert!(!t.contains("[WARNING]"), "helm {args:?}:\n{t}");
    }
    // NOTES.txt tells the next step (helm install --dry-run=client renders it offline)
    let out = helm(&[
        "install",
        "bmx",
        chart,
        "--namespace",
        "backupmx-system",
        "--dry-run=client",
        "--set",
        "watchNamespace=mail",
    ]);
    let t = out_text(&out);
    assert!(out.status.success(), "{t}");
    let notes = &t[t.find("NOTES:").expect("NOTES rendered")..];
    for s in [
        "Scope: namespace mail only",
        "Next step: create a BackupMx in namespace mail",
        "kubectl -n mail apply -f examples/backupmx.yaml",
        "get lease backupmx-operator",
    ] {
        assert!(notes.contains(s), "NOTES lack {s:?}:\n{notes}");
    }

    // the kube version floor is enforced
    let out = helm(&["template", chart, "--kube-version", "1.19.0"]);
    let t = out_text(&out);
    assert!(
        !out.status.success() && t.contains("requires kubeVersion: >=1.20.0-0"),
        "1.19 accepted: {t}"
    );

    // ci/all-values.yaml sets every key of values.yaml (leaves; maps the user fills are leaves)
    fn leaves(v: &Value, path: String, out: &mut BTreeSet<String>) {
        match v.as_object() {
            Some(o) if !o.is_empty() => {
                for (k, v) in o {
                    leaves(v, format!("{path}.{k}"), out);
                }
            }
            _ => {
                out.insert(path);
            }
        }
    }
    let defaults = &docs(&fs::read_to_string(format!("{chart}/values.yaml")).unwrap())[0];
    let all = &docs(&fs::read_to_string(&all_values).unwrap())[0];
    let (mut want, mut have) = (BTreeSet::new(), BTreeSet::new());
    leaves(defaults, String::new(), &mut want);
    leaves(all, String::new(), &mut have);
    // (an empty map by default counts as set when the file puts entries in it)
    let missing: Vec<_> = want
        .iter()
        .filter(|w| {
            !have
                .iter()
                .any(|h| h == *w || h.starts_with(&format!("{w}.")))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "ci/all-values.yaml does not set {missing:?}"
    );
    // and sets them to something else than the default where that means anything
    for key in [
        "replicaCount",
        "watchNamespace",
        "logFormat",
        "dnsResync",
        "image",
        "metrics",
    ] {
        assert_ne!(defaults[key], all[key], "{key} left at its default");
    }

    // every line of values.yaml that sets a key is documented by a comment above it
    let text = fs::read_to_string(format!("{chart}/values.yaml")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let is_key = !t.is_empty() && !t.starts_with('#') && !t.starts_with('-') && t.contains(':');
        if is_key {
            let above = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or(&"");
            assert!(
                above.trim_start().starts_with('#') || t.contains(" # "),
                "values.yaml line {}: {line:?} has no comment",
                i + 1
            );
        }
    }
}

#[test]
fn values_schema_and_chart_refuse_bad_values() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    // (values, what the error must say)
    let cases: &[(&[&str], &[&str])] = &[
        (&["--set", "replicaCount=0"], &["/replicaCount", "minimum"]),
        (&["--set", "image.tag=latest"], &["/image/tag", "not"]),
        (&["--set", "mxpod.image.tag=latest"], &["/mxpod/image/tag"]),
        (
            &["--set", "image.pullPolicy=Sometimes"],
            &["/image/pullPolicy", "IfNotPresent"],
        ),
        (&["--set", "watchNamespace=Mail_Team"], &["/watchNamespace"]),
        (&["--set", "metrics.port=80"], &["/metrics/port", "minimum"]),
        (
            &["--set", "unknownKey=1"],
            &["additional properties", "unknownKey"],
        ),
        (
            &["--set", "serviceMonitor.enabeld=true"],
            &["additional properties", "enabeld"],
        ),
        (
            &["--set", "dnsResync=5 minutes"],
            &["/dnsResync", "does not match pattern"],
        ),
        (&["--set", "logFormat=xml"], &["/logFormat", "json"]),
        (
            &["--set-string", "rbac.create=yes"],
            &["/rbac/create", "boolean"],
        ),
        (
            // (--set reads 1.5 as a string; values files and --set-json give numbers)
            &["--set-json", "prometheusRule.nearRetentionRatio=1.5"],
            &["/prometheusRule/nearRetentionRatio", "exclusiveMaximum"],
        ),
        (
            &["--set", "resources.requests.memory=lots"],
            &["/resources/requests/memory"],
        ),
        // cross-value rules (the schema's allOf/if/then)
        (
            &["--set", "leaderElection.enabled=false"],
            &["/replicaCount", "maximum: got 2, want 1"],
        ),
        (
            &[
                "--set",
                "serviceAccount.create=false",
                "--set",
                "serviceAccount.name=",
            ],
            &["/serviceAccount/name", "minLength"],
        ),
    ];
    for (values, expect) in cases {
        for cmd in ["lint", "template"] {
            let mut args = vec![cmd];
            if cmd == "lint" {
                args.push("--strict");
            }
            args.push(chart);
            args.extend_from_slice(values);
            let out = helm(&args);
            let t = out_text(&out);
            assert!(!out.status.success(), "helm {args:?} accepted it:\n{t}");
            for e in *expect {
                assert!(t.contains(e), "helm {args:?}: the error lacks {e:?}:\n{t}");
            }
        }
    }
    // the templates say the same when the schema is skipped
    for (values, expect) in [
        (
            &["--set", "leaderElection.enabled=false"][..],
            "replicaCount > 1 needs leaderElection.enabled",
        ),
        (
            &[
                "--set",
                "serviceAccount.create=false",
                "--set",
                "serviceAccount.name=",
            ],
            "serviceAccount.name must name an existing ServiceAccount",
        ),
    ] {
        let mut args = vec!["template", chart, "--skip-schema-validation"];
        args.extend_from_slice(values);
        let out = helm(&args);
        let t = out_text(&out);
        assert!(
            !out.status.success() && t.contains(expect),
            "helm {args:?}:\n{t}"
        );
    }
    // without leader election, one replica is fine
    let ok = helm(&[
        "template",
        chart,
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "replicaCount=1",
    ]);
    assert!(ok.status.success(), "{}", out_text(&ok));
}

// === offline: what the chart renders ===

/// The one container of the rendered Deployment.
fn operator_container(docs: &[Value]) -> &Value {
    let deps = find(docs, "Deployment");
    assert_eq!(deps.len(), 1);
    &deps[0]["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The rules of a Role or ClusterRole as (apiGroup/resource[names], sorted verbs).
fn rules(role: &Value) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for r in role["rules"].as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                let names = r["resourceNames"]
                    .as_array()
                    .map(|n| format!("{n:?}"))
                    .unwrap_or_default();
                let key = format!("{}/{}{names}", g.as_str().unwrap(), res.as_str().unwrap());
                let mut verbs: Vec<String> = r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect();
                verbs.sort();
                assert!(
                    out.insert(key.clone(), verbs).is_none(),
                    "{key} in two rules"
                );
            }
        }
    }
    out
}

/// Exactly what operator/src uses in the watched namespaces (see the chart's _helpers.tpl).
fn expected_watch_rules() -> BTreeMap<String, Vec<String>> {
    let v = |s: &[&str]| {
        let mut v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
        v.sort();
        v
    };
    BTreeMap::from([
        (
            "backupmx.io/backupmxes".into(),
            v(&["list", "watch", "patch"]),
        ),
        ("backupmx.io/backupmxes/status".into(), v(&["patch"])),
        (
            "apps/statefulsets".into(),
            v(&["get", "list", "watch", "create", "patch"]),
        ),
        ("/services".into(), v(&["list", "watch", "create", "patch"])),
        (
            "/configmaps".into(),
            v(&["list", "watch", "create", "patch"]),
        ),
        (
            "/secrets".into(),
            v(&["get", "list", "watch", "create", "patch"]),
        ),
        ("/pods".into(), v(&["list", "watch"])),
        (
            "policy/poddisruptionbudgets".into(),
            v(&["create", "patch"]),
        ),
        (
            "networking.k8s.io/networkpolicies".into(),
            v(&["get", "list", "watch", "create", "patch", "delete"]),
        ),
        ("events.k8s.io/events".into(), v(&["create", "patch"])),
    ])
}

#[test]
fn default_render_is_the_operator_for_kubernetes_1_20_with_least_privilege_rbac() {
    let d = docs(&render("bmx", "backupmx-system", &[]));
    let kinds: BTreeSet<String> = d.iter().map(kind_name).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(
            [
                "ServiceAccount/bmx-backupmx-operator",
                "ClusterRole/bmx-backupmx-operator",
                "ClusterRoleBinding/bmx-backupmx-operator",
                "Role/bmx-backupmx-operator-leader-election",
                "RoleBinding/bmx-backupmx-operator-leader-election",
                "Service/bmx-backupmx-operator-metrics",
                "Deployment/bmx-backupmx-operator",
            ]
            .map(String::from)
        ),
        "the default render (no PDB, no monitoring CRs: all served by 1.20)"
    );
    for doc in &d {
        let api = doc["apiVersion"].as_str().unwrap();
        assert!(
            ["v1", "apps/v1", "rbac.authorization.k8s.io/v1"].contains(&api),
            "{} uses {api}",
            kind_name(doc)
        );
    }

    // the Deployment: 2 replicas, leader election, downward API, pinned images, probes, security
    let dep = find(&d, "Deployment")[0];
    assert_eq!(dep["spec"]["replicas"], 2);
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "bmx-backupmx-operator");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = operator_container(&d);
    assert_eq!(c["image"], "backupmx/backupmx-operator:0.1.0");
    assert_eq!(c["imagePullPolicy"], "IfNotPresent");
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(c["resources"]["requests"]["memory"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
    let args = args_of(c);
    for a in [
        "run",
        "--metrics-addr=0.0.0.0:8080",
        "--mxpod-image=backupmx/mx-pod:0.1.0",
        "--dns-resync=5m",
        "--leader-elect=true",
        "--lease-name=backupmx-operator",
        "--log-format=json",
    ] {
        assert!(args.contains(&a.to_string()), "{a} not in {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "cluster scope"
    );
    let env = c["env"].as_array().unwrap();
    let field_ref = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
    };
    assert_eq!(
        field_ref("POD_NAMESPACE"),
        Some(json!("metadata.namespace"))
    );
    assert_eq!(field_ref("POD_NAME"), Some(json!("metadata.name")));
    assert_eq!(c["ports"][0]["containerPort"], 8080);
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "metrics");
    let svc = find(&d, "Service")[0];
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], 8080);

    // the flags the Deployment passes are flags the operator has
    let help = Command::new(backupmx_tests::kube::operator_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = out_text(&help);
    for a in &args[1..] {
        let flag = a.split('=').next().unwrap();
        assert!(
            help.contains(flag),
            "{flag} is not a flag of `backupmx-operator run`"
        );
    }
    for e in ["POD_NAMESPACE", "POD_NAME"] {
        assert!(help.contains(e), "`run` does not read {e}");
    }

    // RBAC: cluster scope, exactly the operator's verbs; the Lease role namespaced, name-bound
    let cr = find(&d, "ClusterRole")[0];
    assert_eq!(rules(cr), expected_watch_rules());
    let crb = find(&d, "ClusterRoleBinding")[0];
    assert_eq!(crb["subjects"][0]["namespace"], "backupmx-system");
    assert_eq!(crb["subjects"][0]["name"], "bmx-backupmx-operator");
    let lease = find(&d, "Role")[0];
    assert_eq!(lease["metadata"]["namespace"], "backupmx-system");
    assert_eq!(
        rules(lease),
        BTreeMap::from([
            (
                "coordination.k8s.io/leases".to_string(),
                vec!["create".to_string()]
            ),
            (
                "coordination.k8s.io/leases[String(\"backupmx-operator\")]".to_string(),
                vec!["get".to_string(), "patch".to_string()]
            ),
        ])
    );
}

#[test]
fn namespace_scope_render_has_a_role_in_the_watched_namespace_only() {
    let d = docs(&render(
        "bmx",
        "backupmx-system",
        &["--set", "watchNamespace=mail"],
    ));
    assert!(find(&d, "ClusterRole").is_empty());
    assert!(find(&d, "ClusterRoleBinding").is_empty());
    let roles = find(&d, "Role");
    assert_eq!(roles.len(), 2);
    let watch = roles
        .iter()
        .find(|r| r["metadata"]["namespace"] == "mail")
        .expect("a Role in mail");
    assert_eq!(rules(watch), expected_watch_rules());
    let lease = roles
        .iter()
        .find(|r| r["metadata"]["namespace"] == "backupmx-system")
        .expect("the Lease Role in the release namespace");
    assert!(
        rules(lease)
            .keys()
            .all(|k| k.starts_with("coordination.k8s.io/leases"))
    );
    let binding = find(&d, "RoleBinding")
        .into_iter()
        .find(|b| b["metadata"]["namespace"] == "mail")
        .unwrap();
    assert_eq!(binding["subjects"][0]["namespace"], "backupmx-system");
    assert!(args_of(operator_container(&d)).contains(&"--namespace=mail".to_string()));
}

#[test]
fn every_render_and_every_example_is_a_valid_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let chart = chart();
    let all_values = chart.join("ci/all-values.yaml");
    let renders = [
        (
            "default",
            render("bmx", "backupmx-system", &["--include-crds"]),
        ),
        (
            "all-values",
            render(
                "bmx",
                "backupmx-system",
                &["--include-crds", "-f", all_values.to_str().unwrap()],
            ),
        ),
        (
            "namespace-scope",
            render(
                "bmx",
                "backupmx-system",
                &["--include-crds", "--set", "watchNamespace=mail"],
            ),
        ),
    ];
    for (name, yaml) in &renders {
        let f = temp_file(&dir, &format!("{name}.yaml"), yaml);
        kubernetes_validate(&f);
        let d = docs(yaml);
        assert!(
            find(&d, "CustomResourceDefinition").len() == 1,
            "{name}: --include-crds renders the CRD"
        );
        // every kind is checked by a validator that knows it: built-ins and the CRD by
        // kubernetes-validate, the Prometheus Operator's by their models
        for doc in &d {
            let api = doc["apiVersion"].as_str().unwrap();
            let group = api.split('/').next().unwrap();
            assert!(
                !api.contains('/')
                    || ["apps", "rbac.authorization.k8s.io", "apiextensions.k8s.io"]
                        .contains(&group)
                    || group == "monitoring.coreos.com",
                "{name}: no validator for {api}"
            );
        }
        if *name == "all-values" {
            let t = validate_models(std::slice::from_ref(&f));
            assert_eq!(t.matches(" valid").count(), 3, "{t}");
        }
    }

    // examples/: every file, every object, each by the validator that knows its kind
    let mut files = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    walk(&repo().join("examples"), &mut files);
    files.sort();
    assert!(files.len() >= 10, "examples: {files:?}");
    let (mut crs, mut models, mut builtins) = (Vec::new(), Vec::new(), Vec::new());
    let mut checked = 0;
    for f in &files {
        assert!(
            f.extension().is_some_and(|e| e == "yaml"),
            "{}: examples are .yaml",
            f.display()
        );
        let d = docs(&fs::read_to_string(f).unwrap());
        assert!(!d.is_empty(), "{}: empty", f.display());
        for doc in &d {
            let api = doc["apiVersion"].as_str().unwrap_or_default();
            let group = api.split('/').next().unwrap();
            if api.starts_with("backupmx.io/") {
                crs.push(f.clone());
            } else if group == "argoproj.io"
                || group.ends_with(".toolkit.fluxcd.io")
                || group == "monitoring.coreos.com"
            {
                models.push(f.clone());
            } else if api.starts_with("kustomize.config.k8s.io/") {
                // a kustomization: build it (kubectl kustomize, offline) and check the result
                let out = Command::new(&tools().kubectl_new)
                    .arg("kustomize")
                    .arg(f.parent().unwrap())
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "kustomize {}: {}",
                    f.display(),
                    out_text(&out)
                );
                let built = String::from_utf8(out.stdout).unwrap();
                let b = temp_file(&dir, "kustomized.yaml", &built);
                kubernetes_validate(&b);
                let t = validate_crs(std::slice::from_ref(&b));
                assert!(t.contains("BackupMx/example") && t.contains("valid"), "{t}");
            } else if !api.contains('.') || group.ends_with(".k8s.io") {
                builtins.push(f.clone());
            } else {
                panic!("{}: no validator for {api}", f.display());
            }
            checked += 1;
        }
    }
    for v in [&mut crs, &mut models, &mut builtins] {
        v.dedup();
    }
    for f in &builtins {
        kubernetes_validate(f);
    }
    let t = validate_crs(&crs);
    assert_eq!(
        t.matches(" valid").count(),
        t.lines().filter(|l| l.starts_with("INFO")).count()
    );
    assert!(
        t.lines().filter(|l| l.contains(" valid")).count() >= 7,
        "{t}"
    );
    let t = validate_models(&models);
    assert!(
        t.contains("HelmRelease/") && t.contains("Application/"),
        "{t}"
    );
    assert!(
        t.contains("GitRepository/") && t.contains("Kustomization/"),
        "{t}"
    );
    assert!(checked >= 16, "{checked} objects checked");

    // one example per DNS provider, with its Secret holding the keys docs/dns.md names
    for (provider, keys) in [
        ("powerdns", &["apiKey"][..]),
        ("rfc2136", &["tsigSecret"]),
        ("cloudflare", &["apiToken"]),
        ("route53", &["accessKeyId", "secretAccessKey"]),
    ] {
        let f = repo().join(format!("examples/dns-{provider}.yaml"));
        let d = docs(&fs::read_to_string(&f).unwrap());
        let bmx = find(&d, "BackupMx")[0];
        assert_eq!(bmx["spec"]["dns"]["provider"], provider);
        let secret_name = &bmx["spec"]["dns"]["credentialsSecretRef"]["name"];
        let secret = find(&d, "Secret")
            .into_iter()
            .find(|s| &s["metadata"]["name"] == secret_name)
            .unwrap_or_else(|| panic!("{provider}: the Secret it names is in the file"));
        for k in keys {
            assert!(secret["stringData"][k].is_string(), "{provider}: key {k}");
        }
    }
    // the GitOps copy of the minimal example is the same object
    let a = docs(&fs::read_to_string(repo().join("examples/backupmx.yaml")).unwrap());
    let b = docs(&fs::read_to_string(repo().join("examples/gitops/mail/backupmx.yaml")).unwrap());
    assert_eq!(
        a, b,
        "examples/gitops/mail/backupmx.yaml drifted from examples/backupmx.yaml"
    );
}

/// Metric names a source file registers (`registry.register("name", ...)`), with the suffixes
/// the Prometheus client adds (counters `_total`, histograms `_bucket/_sum/_count`).
fn registered_metrics(prefix: &str, source: &str) -> BTreeSet<String> {
    let text = fs::read_to_string(repo().join(source)).unwrap();
    let mut names = BTreeSet::new();
    for part in text.split("register(").skip(1) {
        let name = part.trim_start().trim_start_matches('"');
        let name: String = name
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        for suffix in ["", "_total", "_bucket", "_sum", "_count"] {
            names.insert(format!("{prefix}_{name}{suffix}"));
        }
    }
    names
}

fn metrics_used(text: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find(prefix) {
        let tail = &rest[i..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // only whole words (not e.g. `backupmx_operator` module names in comments)
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(name.clone());
        }
        rest = &tail[name.len().max(1)..];
    }
    out
}

#[test]
fn alerts_pass_promtool_and_their_unit_tests_and_use_real_metric_names() {
    let dir = tempfile::tempdir().unwrap();
    // the rule groups exactly as rendered (release r in ops: what alerts.test.yaml expects)
    let yaml = render(
        "r",
        "ops",
        &[
            "--set",
            "prometheusRule.enabled=true",
            "--set",
            "grafanaDashboard.enabled=true",
        ],
    );
    let d = docs(&yaml);
    let rule = find(&d, "PrometheusRule")[0];
    let alerts: Vec<&str> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    for a in [
        "BackupMxPrimaryDown",
        "BackupMxPrimaryUnreachable",
        "BackupMxQueueNotDraining",
        "BackupMxNearRetention",
        "BackupMxDiskFilling",
        "BackupMxQueueFull",
        "BackupMxReconcileErrors",
    ] {
        assert!(alerts.contains(&a), "{a} missing: {alerts:?}");
    }
    let rules_file = temp_file(
        &dir,
        "rules.yaml",
        &serde_json::to_string_pretty(&rule["spec"]).unwrap(), // JSON is YAML
    );
    let check = Command::new(&tools().promtool)
        .args(["check", "rules"])
        .arg(&rules_file)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "promtool check rules: {}",
        out_text(&check)
    );
    fs::copy(
        repo().join("tests/infra/helm/alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .unwrap();
    let test = Command::new(&tools().promtool)
        .args(["test", "rules", "alerts.test.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let t = out_text(&test);
    assert!(
        test.status.success() && t.contains("SUCCESS"),
        "promtool test rules:\n{t}"
    );

    // every metric the alerts and the dashboard use is one mx-pod or the operator exports
    let known: BTreeSet<String> = registered_metrics("mxpod", "mx-pod/src/metrics.rs")
        .into_iter()
        .chain(registered_metrics("backupmx", "operator/src/metrics.rs"))
        .collect();
    assert!(
        known.contains("mxpod_queue_oldest_age_seconds"),
        "{known:?}"
    );
    assert!(
        known.contains("backupmx_reconcile_errors_total"),
        "{known:?}"
    );
    let dashboard = find(&d, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["labels"]["grafana_dashboard"] == "1")
        .expect("the dashboard ConfigMap");
    let json_text = dashboard["data"]["backupmx.json"].as_str().unwrap();
    let dash: Value = serde_json::from_str(json_text).expect("the dashboard is JSON");
    assert!(dash["panels"].as_array().unwrap().len() >= 10);
    let rules_text = serde_json::to_string(&rule["spec"]).unwrap();
    let alert_metrics = &[
        "mxpod_queue_messages",
        "mxpod_queue_oldest_age_seconds",
        "mxpod_queue_disk_bytes",
        "mxpod_delivered_total",
        "mxpod_deferred_total",
        "mxpod_bounced_total",
        "mxpod_rejected_total",
        "backupmx_reconcile_errors_total",
        "backupmx_leader",
        "backupmx_primary_healthy",
    ][..];
    let dashboard_metrics = &[
        "mxpod_queue_messages",
        "mxpod_queue_oldest_age_seconds",
        "mxpod_accepted_total",
        "mxpod_rejected_total",
        "mxpod_delivered_total",
        "mxpod_replay_workers",
        "backupmx_reconcile_total",
        "backupmx_reconcile_errors_total",
        "backupmx_primary_healthy",
        "backupmx_replay_workers",
    ][..];
    for (what, text, wanted) in [
        ("alerts", rules_text.as_str(), alert_metrics),
        ("dashboard", json_text, dashboard_metrics),
    ] {
        let used: BTreeSet<String> = metrics_used(text, "mxpod_")
            .into_iter()
            .chain(metrics_used(text, "backupmx_"))
            .collect();
        let unknown: Vec<_> = used.difference(&known).collect();
        assert!(unknown.is_empty(), "{what} use unknown metrics {unknown:?}");
        for m in wanted {
            assert!(used.contains(*m), "{what} do not use {m}");
        }
        // the label a scrape without honorLabels would have made: never grouped on
        assert!(!text.contains("exported_"), "{what} use exported_ labels");
    }

    // every dashboard query keeps to the BackupMx objects picked in its two variables: each
    // selector of a per-object series filters both (backupmx_leader is about the operator)
    let mut selectors = 0;
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for prefix in ["mxpod_", "backupmx_"] {
                for (i, _) in expr.match_indices(prefix) {
                    let rest = &expr[i..];
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if name == "backupmx_leader" {
                        continue;
                    }
                    let object = if prefix == "mxpod_" {
                        "backupmx"
                    } else {
                        "name"
                    };
                    let wanted =
                        format!(r#"{name}{{namespace=~"$namespace", {object}=~"$backupmx"}}"#);
                    assert!(
                        rest.starts_with(&wanted),
                        "dashboard: {expr} does not select {wanted}"
                    );
                    selectors += 1;
                }
            }
        }
    }
    assert!(selectors >= 16, "{selectors} selectors checked");
}

/// The metric name and labels of a promtool series selector `name{a="x",b="y"}`.
fn series_labels(series: &str) -> (String, BTreeMap<String, String>) {
    let (name, rest) = series.split_once('{').unwrap_or((series, "}"));
    let mut body = rest.strip_suffix('}').expect("a closing brace").trim();
    let mut labels = BTreeMap::new();
    while !body.is_empty() {
        let (key, after) = body.split_once("=\"").expect("label=\"value\"");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("a closing quote") {
                (_, '\\') => value.push(chars.next().expect("an escaped char").1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        assert!(
            labels.insert(key.trim().to_string(), value).is_none(),
            "{series}: {key} twice"
        );
        body = after[end + 1..].trim_start_matches(',').trim();
    }
    (name.to_string(), labels)
}

#[test]
fn service_monitors_keep_the_operators_namespace_label_and_alert_tests_use_scraped_labels() {
    let d = docs(&render(
        "r",
        "ops",
        &["--set", "serviceMonitor.enabled=true"],
    ));
    let monitor = |name: &str| {
        find(&d, "ServiceMonitor")
            .into_iter()
            .find(|m| m["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("ServiceMonitor {name}"))["spec"]["endpoints"][0]
            .clone()
    };
    // the operator's series name their BackupMx's namespace: kept, not exported_namespace
    let operator = monitor("r-backupmx-operator");
    assert_eq!(operator["honorLabels"], true, "{operator}");
    // the pods' series carry no target label: theirs come from Kubernetes only
    let pods = monitor("r-backupmx-operator-mxpods");
    assert_eq!(pods["honorLabels"], false, "{pods}");
    assert_eq!(pods["relabelings"][0]["targetLabel"], "backupmx");
    let metrics_service = find(&d, "Service")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();

    // every series of the promtool tests has the labels those scrapes give it (job = the
    // Service's name, endpoint = the port's), so the rules' grouping is tested against them
    let tests =
        docs(&fs::read_to_string(repo().join("tests/infra/helm/alerts.test.yaml")).unwrap());
    let target = ["job", "instance", "namespace", "service", "endpoint"];
    let mut checked = BTreeSet::new();
    for t in tests[0]["tests"].as_array().unwrap() {
        for input in t["input_series"].as_array().unwrap() {
            let series = input["series"].as_str().unwrap();
            let (name, labels) = series_labels(series);
            for l in target {
                assert!(labels.contains_key(l), "{series}: no target label {l}");
            }
            assert!(
                !labels.keys().any(|k| k.starts_with("exported_")),
                "{series}: a label renamed by a scrape without honorLabels"
            );
            if name.starts_with("mxpod_") {
                assert_eq!(labels["job"], labels["service"], "{series}");
                assert_eq!(labels["endpoint"], pods["port"], "{series}");
                assert_eq!(labels["container"], "mx-pod", "{series}");
                assert_eq!(labels["service"], format!("{}-pods", labels["backupmx"]));
                assert!(
                    labels["pod"].starts_with(&format!("{}-", labels["backupmx"])),
                    "{series}"
                );
            } else if name.starts_with("backupmx_") {
                assert_eq!(labels["job"], labels["service"], "{series}");
                assert_eq!(labels["endpoint"], operator["port"], "{series}");
                assert_eq!(labels["service"], metrics_service.as_str(), "{series}");
                assert_eq!(labels["container"], "operator", "{series}");
                assert!(labels.contains_key("pod"), "{series}");
                // per-BackupMx series: the BackupMx's namespace, not the operator's (ops)
                if labels.contains_key("name") {
                    assert_ne!(labels["namespace"], "ops", "{series}");
                }
            } else {
                // kube-prometheus-stack's kubelet ServiceMonitor (jobLabel k8s-app)
                assert!(name.starts_with("kubelet_"), "{series}: whose metric?");
                assert_eq!(labels["job"], "kubelet", "{series}");
                assert!(labels.contains_key("node"), "{series}");
            }
            checked.insert(name);
        }
    }
    assert!(checked.len() >= 12, "{checked:?}");
}

#[test]
fn dockerfile_and_make_image_build_the_same_image() {
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let make_image = fs::read_to_string(repo().join("images/make-image.sh")).unwrap();
    let build = fs::read_to_string(repo().join("images/build.sh")).unwrap();
    assert!(make_image.contains("IMAGE_USER=\"65532:65532\""));
    assert!(make_image.contains("BIN_DIR=\"/usr/local/bin\""));
    assert_eq!(
        dockerfile.matches("\nUSER 65532:65532\n").count(),
        2,
        "both Dockerfile images run as 65532:65532"
    );
    for name in ["mx-pod", "backupmx-operator"] {
        assert!(
            dockerfile.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{name}\"]")),
            "Dockerfile: entrypoint of {name}"
        );
        assert!(dockerfile.contains(&format!("FROM scratch AS {name}")));
    }
    assert!(
        dockerfile.contains("CMD [\"serve\", \"--config\", \"/etc/mx-pod/config/mx-pod.toml\"]")
    );
    assert!(build.contains("cmd=(serve --config /etc/mx-pod/config/mx-pod.toml)"));
    assert!(dockerfile.contains("CMD [\"run\"]") && build.contains("cmd=(run)"));
    for s in ["+crt-static", "x86_64-unknown-linux-gnu"] {
        assert!(dockerfile.contains(s) && build.contains(s), "{s}");
    }
    // the chart's pods run as the image's user
    let d = docs(&render("bmx", "ns", &[]));
    let pod = &find(&d, "Deployment")[0]["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["runAsGroup"], 65532);
}

// === on the real API server ===

fn kube_env(key: &str) -> String {
    let env = fs::read_to_string(cluster().state.join("env")).unwrap();
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("export {key}=")))
        .unwrap_or_else(|| panic!("{key} not in the cluster's env"))
        .to_string()
}

/// A kubeconfig that authenticates with a TokenRequest token of ServiceAccount `ns/sa`.
async fn service_account_kubeconfig(ns: &str, sa: &str, dir: &tempfile::TempDir) -> PathBuf {
    let client = cluster().client().await;
    // the ServiceAccount was just applied: retry briefly while it is not there yet
    let token = eventually("a TokenRequest token", Duration::from_secs(30), || {
        let client = client.clone();
        async move {
            let body = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": 3600}});
            let request = http::Request::post(format!(
                "/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"
            ))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .unwrap();
            let v: Value = client.request(request).await.ok()?;
            v["status"]["token"].as_str().map(str::to_string)
        }
    })
    .await;
    let path = dir.path().join(format!("{sa}.kubeconfig"));
    let kubeconfig = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "test", "cluster": {
            "server": kube_env("KUBE_API_URL"),
            "certificate-authority": kube_env("KUBE_CA")}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "test", "user": sa}}],
        "current-context": "sa",
    });
    fs::write(&path, serde_json::to_string_pretty(&kubeconfig).unwrap()).unwrap();
    path
}

/// Renders the chart for release namespace `rel` and applies it with kubectl (the tier's v1.20,
/// which validates against the server's own OpenAPI schema). Returns the parsed objects.
fn install(release: &str, rel: &str, args: &[&str]) -> Vec<Value> {
    let yaml = render(release, rel, args);
    let dir = tempfile::tempdir().unwrap();
    let f = temp_file(&dir, "chart.yaml", &yaml);
    cluster().kubectl_ok(&["apply", "-f", f.to_str().unwrap()]);
    docs(&yaml)
}

/// Starts the operator as the chart's ServiceAccount, with the rendered Deployment's own flags
/// and downward-API environment (`namespace` overrides `--namespace` when given).
async fn start_as_chart(
    d: &[Value],
    rel: &str,
    namespace: Option<&str>,
    dir: &tempfile::TempDir,
) -> Operator {
    let sa = find(d, "ServiceAccount")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let kubeconfig = service_account_kubeconfig(rel, &sa, dir).await;
    let c = operator_container(d);
    let mut args: Vec<String> = args_of(c)
        .into_iter()
        .filter(|a| !a.starts_with("--metrics-addr"))
        .filter(|a| namespace.is_none() || !a.starts_with("--namespace"))
        .collect();
    if let Some(ns) = namespace {
        args.push(format!("--namespace={ns}"));
    }
    let identity = format!("{sa}-7d9c-abcde");
    let mut env = Vec::new();
    for e in c["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            Some("metadata.namespace") => rel.to_string(),
            Some("metadata.name") => identity.clone(),
            Some(other) => panic!("unexpected fieldRef {other}"),
            None => e["value"].as_str().unwrap().to_string(),
        };
        env.push((name, value));
    }
    // debug logs of the operator (its watch errors are logged at debug)
    env.retain(|(k, _)| k != "RUST_LOG");
    env.push((
        "RUST_LOG".into(),
        "info,backupmx_operator=debug,kube_runtime=debug".into(),
    ));
    start_operator_as(&kubeconfig, &identity, &args, &env)
}

fn get_json(ns: &str, what: &str) -> Option<Value> {
    let out = cluster().kubectl(&["-n", ns, "get", what, "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// Applies `examples/backupmx.yaml` with its primary moved to 127.0.0.1 (port 1, closed): the
/// operator probes the primary, and tests talk to loopback only.
fn apply_example(ns: &str) {
    let example = fs::read_to_string(repo().join("examples/backupmx.yaml")).unwrap();
    assert!(example.contains("host: mail.example.com"), "{example}");
    let local = example.replace("host: mail.example.com", "host: 127.0.0.1\n    port: 1");
    let dir = tempfile::tempdir().unwrap();
    let file = temp_file(&dir, "backupmx.yaml", &local);
    cluster().kubectl_ok(&["-n", ns, "apply", "-f", file.to_str().unwrap()]);
}

/// What the operator does for one BackupMx, all of it done as the chart's ServiceAccount.
async fn assert_reconciled_fully(operator: &Operator, rel: &str, mail: &str) {
    let start = std::time::Instant::now();
    let bmx = loop {
        if let Some(b) =
            get_json(mail, "bmx/example").filter(|b| b["status"]["observedGeneration"] == 1)
        {
            break b;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the BackupMx was not reconciled in 90 s; operator log:\n{}",
            operator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(bmx["metadata"]["finalizers"][0], "backupmx.io/cleanup");
    let (_, reason, _) = condition(&bmx, "Ready").expect("Ready condition written");
    assert_eq!(reason, "PodsNotReady", "no kubelet here: pods stay pending");
    for what in EXAMPLE_OBJECTS {
        let obj = get_json(mail, what)
            .unwrap_or_else(|| panic!("{what} was not made:\n{}", operator.log_text()));
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["kind"], "BackupMx",
            "{what}"
        );
    }
    let events = eventually(
        "events about the BackupMx",
        Duration::from_secs(30),
        || async {
            let list = get_json(mail, "events.v1.events.k8s.io")?;
            let mine: Vec<Value> = list["items"]
                .as_array()?
                .iter()
                .filter(|e| {
                    e["regarding"]["name"] == "example"
                        && e["reportingController"] == "backupmx-operator"
                })
                .cloned()
                .collect();
            (!mine.is_empty()).then_some(mine)
        },
    )
    .await;
    assert!(
        events.iter().any(|e| e["reason"] == "PodsNotReady"),
        "{events:?}"
    );
    let lease =
        get_json(rel, "lease/backupmx-operator").expect("the Lease in the release namespace");
    assert_eq!(lease["spec"]["holderIdentity"], operator.identity.as_str());
    let (code, metrics) = operator.get("/metrics").await.expect("operator HTTP");
    assert_eq!(code, 200);
    assert!(metrics.contains("backupmx_leader 1"), "{metrics}");
    assert_eq!(operator.get("/readyz").await.map(|r| r.0), Some(200));

    // the NetworkPolicy admits the release namespace (the Deployment's POD_NAMESPACE) to the
    // admin port; opting out deletes it (get + delete as the chart's ServiceAccount)
    let netpol = get_json(mail, "networkpolicy/example-mx-pod").unwrap();
    assert_eq!(
        netpol["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        rel,
        "{netpol}"
    );
    cluster().patch(
        mail,
        "bmx/example",
        &json!({"spec":{"networkPolicy":{"enabled":false}}}),
    );
    let start = std::time::Instant::now();
    while get_json(mail, "networkpolicy/example-mx-pod").is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the NetworkPolicy was not deleted in 30 s; operator log:\n{}",
            operator.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // deletion: drains nothing (no pod ever ran), removes the finalizer, the object goes
    cluster().kubectl_ok(&["-n", mail, "delete", "bmx/example", "--wait=false"]);
    eventually("the BackupMx deleted", Duration::from_secs(60), || async {
        get_json(mail, "bmx/example").is_none().then_some(())
    })
    .await;
    let log = operator.log_text();
    assert!(
        !log.contains("forbidden") && !log.contains("Forbidden"),
        "the chart's RBAC refused something:\n{log}"
    );
}

/// Every value set: what the chart renders is accepted by the v1.20 API server (a server-side
/// dry run, after kubectl 1.20's own validation against the server's OpenAPI schema). The
/// Prometheus Operator's kinds are left out: their CRDs are not installed here (their models
/// checked them offline above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_values_render_is_accepted_by_the_1_20_api_server() {
    let cluster = cluster();
    let ns = cluster.namespace("chart-all").await;
    let all_values = chart().join("ci/all-values.yaml");
    let yaml = render(
        "all",
        &ns,
        &[
            "-f",
            all_values.to_str().unwrap(),
            "--set",
            &format!("watchNamespace={ns}"),
            "--set",
            &format!("grafanaDashboard.namespace={ns}"),
        ],
    );
    let objects: Vec<Value> = docs(&yaml)
        .into_iter()
        .filter(|d| {
            !d["apiVersion"]
                .as_str()
                .unwrap()
                .starts_with("monitoring.coreos.com/")
        })
        .collect();
    assert!(objects.len() >= 8, "{objects:?}");
    let dir = tempfile::tempdir().unwrap();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    let f = temp_file(&dir, "all.json", &list.to_string());
    let out = cluster.kubectl(&["apply", "--dry-run=server", "-f", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", out_text(&out));
    let t = out_text(&out);
    for what in [
        "deployment.apps/backupmx-op",
        "configmap/backupmx-op-dashboard",
        "role.rbac",
    ] {
        assert!(t.contains(what), "{what} not applied: {t}");
    }
}

fn can_i(verb_resource: &[&str], sa: &str) -> bool {
    let mut args = vec!["auth", "can-i"];
    args.extend_from_slice(verb_resource);
    args.extend_from_slice(&["--as", sa]);
    let out = cluster().kubectl(&args);
    String::from_utf8_lossy(&out.stdout).trim() == "yes"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_in_namespace_scope_lets_the_operator_do_everything() {
    let cluster = cluster();
    let rel = cluster.namespace("chart-op").await;
    let mail = cluster.namespace("chart-mail").await;
    let dir = tempfile::tempdir().unwrap();
    let d = install(
        "nsscope",
        &rel,
        &["--set", &format!("watchNamespace={mail}")],
    );
    assert!(find(&d, "ClusterRole").is_empty());
    let operator = start_as_chart(&d, &rel, None, &dir).await;
    apply_example(&mail);
    assert_reconciled_fully(&operator, &rel, &mail).await;

    // least privilege, as the API server sees it
    let sa = format!("system:serviceaccount:{rel}:nsscope-backupmx-operator");
    let ns = ["-n", mail.as_str()];
    for (args, allowed) in [
        (&["patch", "statefulsets"][..], true),
        (&["delete", "statefulsets"], false),
        (&["get", "configmaps"], false),
        (&["update", "backupmxes.backupmx.io"], false),
        (&["delete", "secrets"], false),
        (&["delete", "networkpolicies.networking.k8s.io"], true),
        (&["update", "networkpolicies.networking.k8s.io"], false),
        (&["create", "pods"], false),
        (
            &["list", "backupmxes.backupmx.io", "--all-namespaces"],
            false,
        ),
    ] {
        let mut a = args.to_vec();
        a.extend_from_slice(&ns);
        assert_eq!(can_i(&a, &sa), allowed, "can-i {a:?}");
    }
    assert!(can_i(&["get", "leases/backupmx-operator", "-n", &rel], &sa));
    assert!(!can_i(&["get", "leases/other", "-n", &rel], &sa));
    assert!(!can_i(
        &["update", "leases/backupmx-operator", "-n", &rel],
        &sa
    ));
}

/// Cluster scope: the ClusterRole and ClusterRoleBinding of the default render. The operator
/// runs with `--namespace` here (a cluster-wide one would reconcile the other tests' objects in
/// this shared API server); that its rules hold in every namespace is checked with `can-i`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_in_cluster_scope_lets_the_operator_do_everything() {
    let cluster = cluster();
    let rel = cluster.namespace("chart-cop").await;
    let mail = cluster.namespace("chart-cmail").await;
    let dir = tempfile::tempdir().unwrap();
    let release = format!("c{}", &rel[rel.len() - 6..]);
    let d = install(&release, &rel, &[]);
    assert_eq!(find(&d, "ClusterRole").len(), 1);
    let sa = format!("system:serviceaccount:{rel}:{release}-backupmx-operator");
    for args in [
        &["list", "backupmxes.backupmx.io", "--all-namespaces"][..],
        &["watch", "pods", "--all-namespaces"],
        &["patch", "statefulsets", "-n", "default"],
        &["create", "events.events.k8s.io", "-n", "kube-system"],
    ] {
        assert!(can_i(args, &sa), "cluster scope: can-i {args:?}");
    }
    assert!(!can_i(&["delete", "statefulsets", "-n", "default"], &sa));
    let operator = start_as_chart(&d, &rel, Some(&mail), &dir).await;
    apply_example(&mail);
    assert_reconciled_fully(&operator, &rel, &mail).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_for_another_namespace_does_not_let_the_operator_in() {
    let cluster = cluster();
    let rel = cluster.namespace("chart-xop").await;
    let mail = cluster.namespace("chart-xmail").await;
    let other = cluster.namespace("chart-xother").await;
    let dir = tempfile::tempdir().unwrap();
    // RBAC for `other` only; the operator is told to watch `mail`
    let d = install(
        "xscope",
        &rel,
        &["--set", &format!("watchNamespace={other}")],
    );
    let operator = start_as_chart(&d, &rel, Some(&mail), &dir).await;
    apply_example(&mail);
    eventually(
        "a forbidden error in the operator's log",
        Duration::from_secs(60),
        || async {
            let log = operator.log_text();
            (log.contains("forbidden") && log.contains(&mail)).then_some(())
        },
    )
    .await;
    // the Lease was still taken (its Role is in the release namespace), but nothing was made
    let lease = get_json(&rel, "lease/backupmx-operator").expect("the Lease");
    assert_eq!(lease["spec"]["holderIdentity"], operator.identity.as_str());
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(get_json(&mail, "statefulset/example").is_none());
    assert!(get_json(&mail, "configmap/example-config").is_none());
    let bmx = get_json(&mail, "bmx/example").unwrap();
    assert!(bmx["metadata"]["finalizers"].is_null(), "{bmx}");
    assert!(bmx["status"].is_null(), "{bmx}");
}
