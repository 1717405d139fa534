//! The mx-pods' NetworkPolicy on the real API server: made with the BackupMx and accepted as
//! rendered, fencing the StatefulSet's own admin port to the operator's namespace, following
//! `spec.networkPolicy.adminFromNamespaces`, put back when deleted by hand, deleted when
//! disabled, and a policy of that name the operator did not make left alone. The API server
//! stores NetworkPolicy but does not enforce it (the network plugin does, and this tier has
//! none): these tests check the object, not the traffic.

use std::time::Duration;

use backupmx_tests::kube::{Operator, cluster, eventually};
use serde_json::{Value, json};

const BMX: &str = r#"{"apiVersion":"backupmx.io/v1alpha1","kind":"BackupMx","metadata":{"name":"example"},
  "spec":{"domains":["example.com"],"primary":{"host":"127.0.0.1","port":9},"storage":{"size":"1Gi"},
          "mx":{"hostname":"mx2.example.com"}}}"#;
const POLICY: &str = "networkpolicy/example-mx-pod";

/// The `from` of the ingress rule that opens `port` (Null: no `from`, any source).
fn from_of(policy: &Value, port: u16) -> Value {
    let rules = policy["spec"]["ingress"].as_array().expect("ingress rules");
    let rule = rules
        .iter()
        .find(|r| {
            r["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"] == port)
        })
        .unwrap_or_else(|| panic!("no rule for port {port}: {policy}"));
    assert_eq!(
        rule["ports"],
        json!([{"port": port, "protocol": "TCP"}]),
        "{policy}"
    );
    rule.get("from").cloned().unwrap_or(Value::Null)
}

fn admits(namespaces: &[Value]) -> Value {
    Value::Array(
        namespaces
            .iter()
            .map(|labels| json!({"namespaceSelector": {"matchLabels": labels}}))
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_policy_fences_the_admin_port_follows_the_spec_and_goes_when_disabled() {
    let cluster = cluster();
    let ns = cluster.namespace("netpol").await;
    // the operator's own namespace, as POD_NAMESPACE gives it in a cluster
    let operator_ns = "backupmx-system-test";
    let operator = Operator::start(
        cluster,
        "op-netpol",
        &[
            "--namespace",
            &ns,
            "--leader-elect=false",
            "--lease-namespace",
            operator_ns,
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bmx.json");
    std::fs::write(&file, BMX).unwrap();
    cluster.kubectl_ok(&["-n", &ns, "apply", "-f", &file.to_string_lossy()]);

    // made with the other children, accepted by the API server as rendered
    let policy = eventually("the NetworkPolicy", Duration::from_secs(60), || async {
        cluster.get(&ns, POLICY)
    })
    .await;
    let bmx = cluster.get(&ns, "bmx/example").unwrap();
    let owner = &policy["metadata"]["ownerReferences"][0];
    assert_eq!(
        (&owner["kind"], &owner["uid"], &owner["controller"]),
        (&json!("BackupMx"), &bmx["metadata"]["uid"], &json!(true)),
        "{policy}"
    );
    assert_eq!(
        policy["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "backupmx-operator"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    assert_eq!(policy["spec"]["ingress"].as_array().unwrap().len(), 2);
    // it selects exactly the StatefulSet's pods, and opens the ports their containers name
    let sts = eventually("the StatefulSet", Duration::from_secs(30), || async {
        cluster.get(&ns, "statefulset/example")
    })
    .await;
    let selector = policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    assert_eq!(
        &Value::Object(selector.clone()),
        &sts["spec"]["selector"]["matchLabels"],
        "the StatefulSet's own selector"
    );
    let ports = &sts["spec"]["template"]["spec"]["containers"][0]["ports"];
    let port = |name: &str| {
        ports
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no container port {name}: {ports}"))["containerPort"]
            .as_u64()
            .unwrap() as u16
    };
    let (smtp, admin) = (port("smtp"), port("admin"));
    assert_eq!(from_of(&policy, smtp), Value::Null, "SMTP from anywhere");
    assert_eq!(
        from_of(&policy, admin),
        admits(&[json!({"kubernetes.io/metadata.name": operator_ns})]),
        "admin port: the operator's namespace by default"
    );

    // adminFromNamespaces adds to the operator's namespace: one peer per entry
    let listed = [
        json!({"kubernetes.io/metadata.name": "monitoring"}),
        json!({"team": "mail", "tier": "ops"}),
    ];
    let admitted = [
        json!({"kubernetes.io/metadata.name": operator_ns}),
        listed[0].clone(),
        listed[1].clone(),
    ];
    cluster.patch(
        &ns,
        "bmx/example",
        &json!({"spec": {"networkPolicy": {"adminFromNamespaces": listed}}}),
    );
    let policy = eventually(
        "the listed namespaces in the policy",
        Duration::from_secs(30),
        || async {
            cluster
                .get(&ns, POLICY)
                .filter(|p| from_of(p, admin) == admits(&admitted))
        },
    )
    .await;
    assert_eq!(from_of(&policy, smtp), Value::Null);

    // deleted by hand: put back (the controller watches the policies it owns)
    let uid = policy["metadata"]["uid"].clone();
    cluster.kubectl_ok(&["-n", &ns, "delete", POLICY]);
    let back = eventually(
        "the NetworkPolicy put back",
        Duration::from_secs(20),
        || async {
            cluster
                .get(&ns, POLICY)
                .filter(|p| p["metadata"]["uid"] != uid)
        },
    )
    .await;
    assert_eq!(from_of(&back, admin), admits(&admitted));

    // opt-out: the policy is deleted, and an event says so
    cluster.patch(
        &ns,
        "bmx/example",
        &json!({"spec": {"networkPolicy": {"enabled": false}}}),
    );
    eventually(
        "the NetworkPolicy deleted",
        Duration::from_secs(30),
        || async { cluster.get(&ns, POLICY).is_none().then_some(()) },
    )
    .await;
    eventually(
        "the NetworkPolicyDeleted event",
        Duration::from_secs(30),
        || async {
            let events = cluster.get(&ns, "events.v1.events.k8s.io")?;
            events["items"]
                .as_array()?
                .iter()
                .any(|e| {
                    e["reason"] == "NetworkPolicyDeleted" && e["regarding"]["name"] == "example"
                })
                .then_some(())
        },
    )
    .await;

    // a policy of that name someone else made survives the next passes
    let theirs = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "example-mx-pod"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}});
    let file = dir.path().join("theirs.json");
    std::fs::write(&file, theirs.to_string()).unwrap();
    cluster.kubectl_ok(&["-n", &ns, "apply", "-f", &file.to_string_lossy()]);
    // a pass that started after the policy was made, and has finished
    operator.another_pass(cluster, &ns, "example").await;
    let kept = cluster.get(&ns, POLICY).expect("their policy kept");
    assert!(kept["metadata"]["ownerReferences"].is_null(), "{kept}");
    assert_eq!(kept["spec"]["podSelector"], json!({}));
}
