//! Two operator replicas with Lease leader election: one reconciles, the other waits; when the
//! leader is killed (`kill -9`, no chance to release the Lease) the other takes over once the
//! lease expires and reconciles what was created meanwhile.

use std::time::{Duration, Instant};

use backupmx_tests::kube::{Operator, cluster, eventually};
use serde_json::Value;

fn apply_bmx(ns: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bmx.json");
    std::fs::write(
        &file,
        serde_json::json!({"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
            "metadata": {"name": name},
            "spec": {"domains": ["example.com"], "primary": {"host": "127.0.0.1", "port": 9},
                     "storage": {"size": "1Gi"}, "mx": {"hostname": "mx2.example.com"}}})
        .to_string(),
    )
    .unwrap();
    cluster().kubectl_ok(&["-n", ns, "apply", "-f", &file.to_string_lossy()]);
}

fn holder(ns: &str) -> Option<String> {
    let out = cluster().kubectl(&["-n", ns, "get", "lease/backupmx-operator", "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["spec"]["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

fn has(ns: &str, what: &str) -> bool {
    cluster().kubectl(&["-n", ns, "get", what]).status.success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_leader_dies() {
    let cluster = cluster();
    let ns = cluster.namespace("leader").await;
    let args = ["--namespace", ns.as_str(), "--lease-namespace", ns.as_str()];
    let mut a = Operator::start(cluster, "replica-a", &args);
    let mut b = Operator::start(cluster, "replica-b", &args);

    let first = eventually("a leader", Duration::from_secs(60), || async {
        holder(&ns)
    })
    .await;
    apply_bmx(&ns, "one");
    eventually("the leader reconciles", Duration::from_secs(60), || async {
        has(&ns, "statefulset/one").then_some(())
    })
    .await;
    let (leader, standby) = if first == "replica-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(leader.identity, first);
    assert_eq!(
        standby.reconciles(&ns, "one").await,
        0,
        "the standby must not reconcile"
    );
    let metrics = standby
        .get("/metrics")
        .await
        .expect("standby serves metrics")
        .1;
    assert!(metrics.contains("backupmx_leader 0"), "{metrics}");

    leader.kill9();
    let killed = Instant::now();
    apply_bmx(&ns, "two");
    eventually(
        "the standby to take over and reconcile",
        Duration::from_secs(90),
        || async { has(&ns, "statefulset/two").then_some(()) },
    )
    .await;
    let took = killed.elapsed();
    println!(
        "leader killed; standby reconciled a new object after {:.1} s (lease {} s)",
        took.as_secs_f64(),
        backupmx_operator::leader::LEASE_SECONDS
    );
    assert_eq!(holder(&ns).as_deref(), Some(standby.identity.as_str()));
    let metrics = standby.get("/metrics").await.unwrap().1;
    assert!(metrics.contains("backupmx_leader 1"), "{metrics}");

    // a graceful stop releases the lease and exits 0
    let status = standby.stop().await;
    assert!(status.success(), "{status}:\n{}", standby.log_text());
    eventually("the lease released", Duration::from_secs(20), || async {
        holder(&ns).is_none().then_some(())
    })
    .await;
}
