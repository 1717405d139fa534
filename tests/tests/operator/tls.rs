//! The primary's TLS policy through the operator. Under `tlsPolicy: verify` (the primary's CA in
//! `spec.caBundle`) a primary that answers SMTP but offers no STARTTLS cannot take mail:
//! `PrimaryHealthy=False` with reason `PrimaryTlsFailed`, replay held, the mail queued and never
//! sent in plaintext. Once the primary offers TLS with a certificate from that CA, the probe
//! verifies it, replay starts, and the pod (running the operator's rendered configuration, CA
//! bundle mounted) delivers in order over verified TLS.

use std::time::Duration;

use backupmx_tests::{
    MxPod, Primary,
    kube::{Operator, cluster, condition, eventually, rendered_pod_config, run_pod},
    send_all, with_tag,
};
use serde_json::{Value, json};
use testkit::TestCa;

fn bmx(cluster: &backupmx_tests::kube::Cluster, ns: &str) -> Option<Value> {
    let out = cluster.kubectl(&["-n", ns, "get", "bmx/example", "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_holds_mail_for_a_primary_without_tls_and_delivers_once_its_certificate_verifies() {
    let cluster = cluster();
    let ns = cluster.namespace("tls").await;
    let primary = Primary::start(); // answers SMTP, no STARTTLS yet
    let port: u16 = primary.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let ca = TestCa::new("the primary's CA");
    let _op = Operator::start(
        cluster,
        "op-tls",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    cluster.apply(
        Some(&ns),
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "primary-ca"},
                "stringData": {"ca.crt": ca.pem()}}),
    );
    cluster.apply(
        Some(&ns),
        &json!({"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
        "metadata": {"name": "example"},
        "spec": {
            "domains": ["example.test"], "replicas": 1, "deletionPolicy": "Orphan",
            "primary": {"host": "127.0.0.1", "port": port, "tlsPolicy": "verify",
                        "healthCheck": {"interval": "2s", "timeout": "2s",
                                        "failureThreshold": 2, "successThreshold": 2}},
            "caBundle": {"secretName": "primary-ca"},
            "storage": {"size": "1Gi"}, "mx": {"hostname": "mx2.example.test"},
            "replay": {"maxWorkers": 2, "ratePerSecond": 0, "rampUp": "2s"},
        }}),
    );

    // the bundle is read and accepted before anything is applied
    let ready = eventually("a Ready condition", Duration::from_secs(60), || async {
        condition(&bmx(cluster, &ns)?, "Ready")
    })
    .await;
    assert_ne!(ready.1, "CaBundleInvalid", "{ready:?}");
    assert_ne!(ready.1, "InvalidSpec", "{ready:?}");
    let client = cluster.client().await;
    let (rendered, token) = rendered_pod_config(&client, &ns, "example").await;
    assert!(
        rendered.contains("tls_policy = \"verify\""),
        "the policy reaches the pods: {rendered}"
    );
    let ip = "127.0.0.191";
    let pod = MxPod::start_rendered(&rendered, ip.parse().unwrap(), &token, Some(&ca.pem())).await;
    run_pod(&client, &ns, "example-0", ip).await;

    // no STARTTLS: unusable under verify, although it answers SMTP
    let (_, _, message_text) = eventually(
        "PrimaryHealthy=False PrimaryTlsFailed",
        Duration::from_secs(60),
        || async {
            let c = condition(&bmx(cluster, &ns)?, "PrimaryHealthy")?;
            (c.1 == "PrimaryTlsFailed").then_some(c)
        },
    )
    .await;
    assert!(
        message_text.contains("STARTTLS is not offered") && message_text.contains("verify"),
        "{message_text}"
    );
    send_all(pod.smtp, "alice@sender.test", "tls", 0..3, 500).await;
    let b = bmx(cluster, &ns).unwrap();
    assert_eq!(b["status"]["replay"]["workers"], 0, "{}", b["status"]);
    assert_eq!(pod.queued().await, 3);
    assert!(
        !primary.maillog().contains("END-OF-MESSAGE"),
        "nothing went in plaintext"
    );

    // the primary gets a certificate from the CA in spec.caBundle: verified, replayed
    let (cert, key) = ca
        .issue(&["127.0.0.1"])
        .write(&primary.dir.path().join("etc"));
    primary.enable_tls(&cert, &key, "may").await;
    eventually("PrimaryHealthy=True", Duration::from_secs(60), || async {
        let c = condition(&bmx(cluster, &ns)?, "PrimaryHealthy")?;
        (c.0 == "True").then_some(())
    })
    .await;
    pod.wait_empty(Duration::from_secs(90)).await;
    let order = with_tag(&primary.received_order(), "tls");
    let expected: Vec<String> = (0..3).map(|i| format!("tls.{i}@test")).collect();
    assert_eq!(order, expected);
    assert_eq!(
        pod.metric("mxpod_delivered_messages_total{domain=\"example.test\",tls=\"yes\"}")
            .await,
        3.0
    );
}
