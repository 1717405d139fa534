//! Bad specs: what the schema rejects at `kubectl apply`, and what the operator refuses with
//! `Ready=False` (reason `InvalidSpec`), an event, and no objects applied.

use std::time::Duration;

use backupmx_tests::kube::{Operator, cluster, condition, eventually};
use serde_json::Value;

const VALID: &str = r#"{"apiVersion":"backupmx.io/v1alpha1","kind":"BackupMx","metadata":{"name":"NAME"},
  "spec":{"domains":["example.com"],"primary":{"host":"127.0.0.1","port":9},"storage":{"size":"1Gi"},
          "mx":{"hostname":"mx2.example.com"}}}"#;

/// `kubectl apply` without kubectl's own validation: what the API server's schema says.
fn apply(ns: &str, json: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bmx.json");
    std::fs::write(&file, json).unwrap();
    cluster().kubectl(&[
        "-n",
        ns,
        "apply",
        "--validate=false",
        "-f",
        &file.to_string_lossy(),
    ])
}

fn with(name: &str, edit: impl FnOnce(&mut Value)) -> String {
    let mut v: Value = serde_json::from_str(&VALID.replace("NAME", name)).unwrap();
    edit(&mut v);
    v.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_rejects_malformed_fields_at_apply() {
    let cluster = cluster();
    let ns = cluster.namespace("schema").await;
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "no-domains",
            Box::new(|v| v["spec"]["domains"] = serde_json::json!([])),
            "spec.domains",
        ),
        (
            "bad-duration",
            Box::new(|v| v["spec"]["retention"] = "5 fortnights".into()),
            "spec.retention",
        ),
        (
            "zero-replicas",
            Box::new(|v| v["spec"]["replicas"] = 0.into()),
            "spec.replicas",
        ),
        (
            "bad-policy",
            Box::new(|v| v["spec"]["deletionPolicy"] = "Keep".into()),
            "spec.deletionPolicy",
        ),
        (
            "bad-size",
            Box::new(|v| v["spec"]["storage"]["size"] = "ten gigs".into()),
            "spec.storage.size",
        ),
        (
            "no-mx",
            Box::new(|v| {
                v["spec"].as_object_mut().unwrap().remove("mx");
            }),
            "spec.mx",
        ),
        (
            "bad-host",
            Box::new(|v| v["spec"]["mx"]["hostname"] = "mx2 example".into()),
            "spec.mx.hostname",
        ),
    ];
    for (name, edit, field) in cases {
        let out = apply(&ns, &with(name, edit));
        let text = backupmx_tests::kube::text(&out);
        assert!(!out.status.success(), "{name}: accepted by the schema");
        assert!(
            text.contains(field),
            "{name}: the error does not name {field}: {text}"
        );
    }
    // the examples pass the server's schema
    for example in ["examples/backupmx.yaml", "examples/backupmx-full.yaml"] {
        let path = backupmx_tests::repo().join(example);
        let out = cluster.kubectl(&[
            "-n",
            &ns,
            "apply",
            "--validate=false",
            "--dry-run=server",
            "-f",
            &path.to_string_lossy(),
        ]);
        assert!(
            out.status.success(),
            "{example}: {}",
            backupmx_tests::kube::text(&out)
        );
    }
    // defaults come from the schema
    let out = apply(&ns, &with("defaults", |_| {}));
    assert!(out.status.success(), "{}", backupmx_tests::kube::text(&out));
    let v: Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "-n",
        &ns,
        "get",
        "bmx/defaults",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(v["spec"]["replicas"], 2);
    assert_eq!(v["spec"]["retention"], "5d");
    assert_eq!(v["spec"]["primary"]["healthCheck"]["interval"], "10s");
    assert_eq!(v["spec"]["replay"]["rampUp"], "2m");
    assert_eq!(v["spec"]["deletionPolicy"], "Drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_is_refused_with_a_reason_an_event_and_nothing_applied() {
    let cluster = cluster();
    let ns = cluster.namespace("invalid").await;
    let _operator = Operator::start(
        cluster,
        "op-invalid",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    // passes the schema, fails the operator's checks: the backup named like the primary,
    // a delay warning after the bounce
    let bad = with("bad", |v| {
        v["spec"]["primary"]["host"] = "mail.example.com".into();
        v["spec"]["mx"]["hostname"] = "mail.example.com".into();
        v["spec"]["retention"] = "1h".into();
        v["spec"]["delayWarning"] = "4h".into();
    });
    let out = apply(&ns, &bad);
    assert!(out.status.success(), "{}", backupmx_tests::kube::text(&out));
    let bmx = eventually(
        "Ready=False InvalidSpec",
        Duration::from_secs(60),
        || async {
            let v: Value = serde_json::from_str(
                &cluster.kubectl_ok(&["-n", &ns, "get", "bmx/bad", "-o", "json"]),
            )
            .ok()?;
            condition(&v, "Ready")
                .filter(|(s, r, _)| s == "False" && r == "InvalidSpec")
                .map(|c| (v, c))
        },
    )
    .await;
    let (_, (_, _, message)) = &bmx;
    assert!(message.contains("spec.mx.hostname"), "{message}");
    assert!(message.contains("spec.delayWarning"), "{message}");
    assert_eq!(bmx.0["status"]["observedGeneration"], 1);

    let events = cluster.events(&ns);
    let events: Value = serde_json::from_str(&events).unwrap();
    let found = events["items"].as_array().unwrap().iter().any(|e| {
        e["reason"] == "InvalidSpec" && e["type"] == "Warning" && e["regarding"]["name"] == "bad"
    });
    assert!(found, "no InvalidSpec event: {events}");
    let describe = cluster.kubectl_ok(&["-n", &ns, "describe", "bmx/bad"]);
    assert!(describe.contains("InvalidSpec"), "{describe}");

    // nothing was applied
    for what in [
        "statefulset/bad",
        "configmap/bad-config",
        "secret/bad-admin-token",
        "service/bad-smtp",
    ] {
        let out = cluster.kubectl(&["-n", &ns, "get", what]);
        assert!(!out.status.success(), "{what} exists for an invalid spec");
    }

    // fixed: the objects appear and Ready leaves InvalidSpec
    let good = with("bad", |_| {});
    assert!(apply(&ns, &good).status.success());
    eventually(
        "the StatefulSet after the fix",
        Duration::from_secs(60),
        || async {
            cluster
                .kubectl(&["-n", &ns, "get", "statefulset/bad"])
                .status
                .success()
                .then_some(())
        },
    )
    .await;
    eventually(
        "Ready no longer InvalidSpec",
        Duration::from_secs(60),
        || async {
            let v: Value = serde_json::from_str(
                &cluster.kubectl_ok(&["-n", &ns, "get", "bmx/bad", "-o", "json"]),
            )
            .ok()?;
            condition(&v, "Ready").filter(|(_, r, _)| r != "InvalidSpec")
        },
    )
    .await;
}
