//! Bounces on Kubernetes: `spec.dsn.relay` sends every DSN through a relay, since many clouds
//! block port 25 from pods. The pod runs the operator's own rendered configuration (from the
//! ConfigMap; only its listen addresses and paths are the host's); a message that outlives
//! `retention` while the primary is down is bounced, and the DSN reaches a real Postfix relay.

use std::time::Duration;

use backupmx_tests::{
    MxPod, Primary,
    kube::{Operator, cluster, eventually, rendered_pod_config, run_pod},
    message, send,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_messages_dsn_reaches_the_relay_named_in_the_spec() {
    let cluster = cluster();
    let ns = cluster.namespace("dsn").await;
    let mut primary = Primary::start();
    primary.down(); // down for good: the mail expires
    let port: u16 = primary.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    // the relay: a real Postfix taking mail for example.test, the sender's domain
    let relay = Primary::start();
    let _op = Operator::start(
        cluster,
        "op-dsn",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    let bmx = json!({
        "apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
        "metadata": {"name": "example"},
        "spec": {
            "domains": ["example.test"], "replicas": 1, "deletionPolicy": "Orphan",
            "primary": {"host": "127.0.0.1", "port": port,
                        "healthCheck": {"interval": "1s", "timeout": "1s"}},
            "retention": "20s", "delayWarning": "20s",
            "dsn": {"relay": relay.addr(), "tlsPolicy": "may"},
            "storage": {"size": "1Gi"}, "mx": {"hostname": "mx2.example.test"},
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bmx.json");
    std::fs::write(&file, bmx.to_string()).unwrap();
    cluster.kubectl_ok(&["-n", &ns, "apply", "-f", &file.to_string_lossy()]);

    let client = cluster.client().await;
    let (rendered, token) = rendered_pod_config(&client, &ns, "example").await;
    assert!(
        rendered.contains(&format!("relay = \"{}\"", relay.addr())),
        "the relay is rendered: {rendered}"
    );
    let ip = "127.0.0.181";
    let pod = MxPod::start_rendered(&rendered, ip.parse().unwrap(), &token, None).await;
    run_pod(&client, &ns, "example-0", ip).await;

    let r = send(
        pod.smtp,
        "alice@example.test",
        &["user@example.test"],
        &message("expires", 0, 400),
    )
    .await
    .unwrap();
    assert!(r.ok(), "{r:?}");

    let dsn = eventually(
        "the bounce at the relay",
        Duration::from_secs(120),
        || async {
            relay
                .delivered()
                .into_iter()
                .map(|m| String::from_utf8_lossy(&m).into_owned())
                .find(|m| m.contains("Action: failed"))
        },
    )
    .await;
    for needle in [
        "multipart/report",
        "Final-Recipient: rfc822; user@example.test",
        "Message-ID: <expires.0@test>",
    ] {
        assert!(dsn.contains(needle), "DSN lacks {needle:?}:\n{dsn}");
    }
    assert!(
        dsn.contains("Received: from mx2.example.test"),
        "it came from the pod through the relay:\n{dsn}"
    );
    pod.wait_empty(Duration::from_secs(30)).await;
    assert!(primary.delivered().is_empty());
}
