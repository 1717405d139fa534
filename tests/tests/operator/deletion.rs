//! Deletion: with `deletionPolicy: Drain` the finalizer tells the pods to drain and waits until
//! their queues are empty (status and events say why); with `Orphan` it does not wait. Volume
//! claims are kept either way. The pod is a real mx-pod on the pod's IP (the test plays the
//! kubelet), holding real queued mail.

use std::time::Duration;

use backupmx_tests::{
    MxPod, MxPodConfig, Sink, free_port,
    kube::{Cluster, Operator, cluster, condition, eventually, run_pod},
    message, send,
};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;

fn bmx_json(name: &str, policy: &str, primary_port: u16) -> String {
    serde_json::json!({"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
        "metadata": {"name": name},
        "spec": {"domains": ["example.test"], "replicas": 1, "deletionPolicy": policy,
                 "primary": {"host": "127.0.0.1", "port": primary_port,
                             "healthCheck": {"interval": "1s", "timeout": "1s", "failureThreshold": 1, "successThreshold": 1}},
                 "replay": {"rampUp": "1s"},
                 "storage": {"size": "1Gi"}, "mx": {"hostname": "mx2.example.test"}}})
    .to_string()
}

/// Applies a one-replica BackupMx and runs its pod as a real mx-pod at `ip` holding `n`
/// messages (replay held); returns the mx-pod.
async fn pod_with_mail(
    cluster: &Cluster,
    ns: &str,
    name: &str,
    policy: &str,
    ip: [u8; 4],
    primary_port: u16,
    n: usize,
) -> MxPod {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bmx.json");
    std::fs::write(&file, bmx_json(name, policy, primary_port)).unwrap();
    cluster.kubectl_ok(&["-n", ns, "apply", "-f", &file.to_string_lossy()]);
    let client = cluster.client().await;
    let token = backupmx_tests::kube::admin_token(&client, ns, name).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod_name = format!("{name}-0");
    eventually("the StatefulSet's pod", Duration::from_secs(60), || async {
        pods.get_opt(&pod_name).await.ok()?
    })
    .await;

    let mut cfg = MxPodConfig::new(&format!("127.0.0.1:{primary_port}"));
    cfg.ip = ip.into();
    cfg.admin_port = Some(backupmx_operator::render::ADMIN_PORT);
    cfg.token = Some(token);
    cfg.workers = 0; // hold: the primary is "down"
    let pod = MxPod::start(cfg).await;
    for i in 0..n {
        let r = send(
            pod.smtp,
            "sender@sender.test",
            &["user@example.test"],
            &message(name, i, 400),
        )
        .await
        .unwrap();
        assert!(r.ok(), "{r:?}");
    }
    run_pod(&client, ns, &pod_name, &ip.map(|b| b.to_string()).join(".")).await;
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_deletion_waits_until_the_queue_is_delivered_and_keeps_the_volume() {
    let cluster = cluster();
    let ns = cluster.namespace("drain").await;
    let _operator = Operator::start(
        cluster,
        "op-drain",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    let primary_port = free_port();
    let pod = pod_with_mail(
        cluster,
        &ns,
        "drain",
        "Drain",
        [127, 0, 0, 71],
        primary_port,
        3,
    )
    .await;

    // status: queue figures read from the pod's admin API, pods ready
    let bmx = eventually(
        "status.queue.messages = 3",
        Duration::from_secs(60),
        || async {
            cluster
                .get(&ns, "bmx/drain")
                .filter(|b| b["status"]["queue"]["messages"] == 3)
        },
    )
    .await;
    assert_eq!(
        bmx["status"]["queue"]["domains"][0]["domain"],
        "example.test"
    );
    assert_eq!(bmx["status"]["queue"]["domains"][0]["messages"], 3);
    assert_eq!(bmx["status"]["queue"]["pods"][0]["pod"], "drain-0");
    eventually(
        "Ready=True once the pod is ready",
        Duration::from_secs(60),
        || async {
            let b = cluster.get(&ns, "bmx/drain")?;
            (condition(&b, "Ready")?.0 == "True" && b["status"]["readyReplicas"] == 1).then_some(())
        },
    )
    .await;

    // delete: the finalizer drains the pod and waits
    cluster.kubectl_ok(&["-n", &ns, "delete", "bmx/drain", "--wait=false"]);
    let (_, reason, message) = eventually(
        "Deleting=True WaitingForDelivery",
        Duration::from_secs(60),
        || async {
            condition(&cluster.get(&ns, "bmx/drain")?, "Deleting").filter(|(s, _, _)| s == "True")
        },
    )
    .await;
    assert_eq!(reason, "WaitingForDelivery");
    assert!(message.contains("drain-0: 3"), "{message}");
    let (_, q) = pod.get("/v1/queue").await;
    assert_eq!(q["draining"], true, "the pod was told to drain: {q}");
    let events = cluster.events(&ns);
    assert!(events.contains("WaitingForDelivery"), "{events}");
    // still there while mail is queued
    let bmx = cluster
        .get(&ns, "bmx/drain")
        .expect("not deleted while mail is queued");
    assert!(bmx["metadata"]["deletionTimestamp"].is_string());

    // the primary comes back: the pod delivers, deletion completes
    let sink = Sink::start(&[], primary_port, true).await;
    // the operator's probe sees the primary and gives the pod workers
    eventually(
        "the operator to set replay workers",
        Duration::from_secs(60),
        || async {
            let (_, r) = pod.get("/v1/replay").await;
            (r["workers"].as_u64().unwrap_or(0) > 0).then_some(())
        },
    )
    .await;
    pod.wait_empty(Duration::from_secs(60)).await;
    eventually(
        "the BackupMx to be deleted",
        Duration::from_secs(60),
        || async {
            (!cluster
                .kubectl(&["-n", &ns, "get", "bmx/drain"])
                .status
                .success())
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        sink.dumped().len(),
        3,
        "every queued message reached the primary"
    );
    // the volume claim outlives the BackupMx
    let pvc = cluster.get(&ns, "pvc/queue-drain-0").expect("PVC kept");
    assert!(pvc["metadata"]["deletionTimestamp"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_deletion_does_not_wait_and_keeps_the_volume() {
    let cluster = cluster();
    let ns = cluster.namespace("orphan").await;
    let _operator = Operator::start(
        cluster,
        "op-orphan",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    let pod = pod_with_mail(
        cluster,
        &ns,
        "orphan",
        "Orphan",
        [127, 0, 0, 72],
        free_port(),
        2,
    )
    .await;
    eventually(
        "status.queue.messages = 2",
        Duration::from_secs(60),
        || async {
            cluster
                .get(&ns, "bmx/orphan")
                .filter(|b| b["status"]["queue"]["messages"] == 2)
        },
    )
    .await;
    cluster.kubectl_ok(&["-n", &ns, "delete", "bmx/orphan", "--wait=false"]);
    eventually(
        "the BackupMx to be deleted",
        Duration::from_secs(60),
        || async {
            (!cluster
                .kubectl(&["-n", &ns, "get", "bmx/orphan"])
                .status
                .success())
            .then_some(())
        },
    )
    .await;
    assert_eq!(pod.queued().await, 2, "the mail stays where it was");
    assert!(cluster.get(&ns, "pvc/queue-orphan-0").is_some(), "PVC kept");
    let events = cluster.events(&ns);
    assert!(events.contains("Orphaned"), "{events}");
}
