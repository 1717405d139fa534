//! Issue 8: the operator drives replay with its StatefulSet's pods run by a REAL kubelet
//! (containerd, runc, the CNI bridge) from the `backupmx/mx-pod:VERSION` image, their queues on
//! PersistentVolumes, and the operator running outside the cluster as a process that reaches
//! the pods on their pod IPs. The real-node twins of `tests/operator/replay.rs` (where the test
//! plays the kubelet): outage and ramp, maintenance window, cutover, scale-down drain, webhook
//! alerts, failover drill. Issue 9's disaster scenarios (pods deleted and killed under load,
//! a rolling update, the leader killed, rspamd during an outage, a full volume, deletion with
//! DNS, spec errors) are in [`disaster`].
//!
//! The primaries are real Postfix instances listening on the node's gateway address (where pods
//! reach the host); mail is sent to the pods' IPs on port 2525. The control plane and the node
//! are started once for this test binary (`backupmx_tests::node::node`) and stopped, with the
//! host's state restored, when it exits.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use backupmx_tests::{
    kube::{Operator, condition, eventually, operator_bin, text},
    message,
    node::{BridgePrimary, NamespaceGuard, Node, POD_TIMEOUT, RunningPod, STORAGE_CLASS, node},
    send, seq_of,
    webhook::Webhook,
    with_tag,
};
use serde_json::{Value, json};

mod disaster;

/// A BackupMx `example` for example.test whose primary is `primary`, probed every second, on
/// volumes of the harness' StorageClass.
fn backupmx(primary: &BridgePrimary, replicas: usize, extra: Value) -> Value {
    let mut spec = json!({
        "domains": ["example.test"], "replicas": replicas, "deletionPolicy": "Orphan",
        "primary": {"host": primary.gateway.to_string(), "port": primary.port(),
                    "healthCheck": {"interval": "1s", "timeout": "1s", "failureThreshold": 2, "successThreshold": 2}},
        "storage": {"size": "1Gi", "storageClassName": STORAGE_CLASS},
        "mx": {"hostname": "mx2.example.test"},
        "replay": {"maxWorkers": 3, "ratePerSecond": 2, "rampUp": "6s"},
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
           "metadata": {"name": "example"}, "spec": spec})
}

/// One scenario's namespace, operator, pods and admin token.
struct Setup {
    node: &'static Node,
    ns: String,
    op: Operator,
    token: String,
    pods: Vec<RunningPod>,
    started: Instant,
    _guard: NamespaceGuard,
}

impl Setup {
    /// A namespace, volumes for `replicas` pods, the operator, the BackupMx; returns once every
    /// pod is Running and Ready on the node.
    async fn new(prefix: &str, primary: &BridgePrimary, replicas: usize, extra: Value) -> Setup {
        Self::new_with(prefix, primary, replicas, extra, false, |_, _| {}).await
    }

    /// [`Setup::new`], the operator electing a leader through a Lease in the namespace when
    /// `leader_election`, and `prepare(namespace, volume directories)` run before the
    /// BackupMx is applied.
    async fn new_with(
        prefix: &str,
        primary: &BridgePrimary,
        replicas: usize,
        extra: Value,
        leader_election: bool,
        prepare: impl FnOnce(&str, &[std::path::PathBuf]),
    ) -> Setup {
        let node = node();
        let started = Instant::now();
        let ns = node.namespace(prefix).await;
        let guard = NamespaceGuard { ns: ns.clone() };
        let dirs = node.volumes(&ns, "queue", "example", replicas, "1Gi");
        prepare(&ns, &dirs);
        let op = if leader_election {
            node.operator_with(&ns, &format!("op-{prefix}-a"), &["--lease-namespace", &ns])
        } else {
            node.operator(&ns, &format!("op-{prefix}"))
        };
        node.apply(Some(&ns), &backupmx(primary, replicas, extra));
        let token = node.admin_token(&ns, "example").await;
        let mut pods = Vec::new();
        for i in 0..replicas {
            pods.push(
                node.ready_pod(&ns, &format!("example-{i}"), None, POD_TIMEOUT)
                    .await,
            );
        }
        println!(
            "[{prefix}] {replicas} pod(s) Ready on the node in {:.1?}: {:?}",
            started.elapsed(),
            pods.iter().map(|p| p.ip).collect::<Vec<_>>()
        );
        Setup {
            node,
            ns,
            op,
            token,
            pods,
            started,
            _guard: guard,
        }
    }

    fn status(&self) -> Value {
        self.node
            .get(&self.ns, "bmx/example")
            .map(|b| b["status"].clone())
            .unwrap_or(Value::Null)
    }

    fn bmx(&self) -> Option<Value> {
        self.node.get(&self.ns, "bmx/example")
    }

    fn patch(&self, patch: Value) {
        self.node.kubectl_ok(&[
            "-n",
            &self.ns,
            "patch",
            "bmx/example",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ]);
    }

    fn events(&self) -> String {
        self.node.kubectl_ok(&[
            "-n",
            &self.ns,
            "get",
            "events.v1.events.k8s.io",
            "-o",
            "json",
        ])
    }

    async fn wait_reason(&self, reason: &str) {
        eventually(
            &format!("status.replay.reason {reason}"),
            Duration::from_secs(60),
            || async { (self.status()["replay"]["reason"] == reason).then_some(()) },
        )
        .await;
    }

    fn done(&self, what: &str) {
        println!(
            "[{}] {what}: passed in {:.1?}",
            self.ns,
            self.started.elapsed()
        );
    }
}

/// Sends `n` messages tagged `tag` to `to`, each acknowledged; returns their Message-IDs.
async fn send_n(to: SocketAddr, tag: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = send(
            to,
            "sender@sender.test",
            &["user@example.test"],
            &message(tag, i, 300),
        )
        .await
        .unwrap_or_else(|e| panic!("SMTP to {to}: {e}"));
        assert!(r.ok(), "{r:?}");
        ids.push(format!("{tag}.{i}@test"));
    }
    ids
}

/// (a) An outage: the operator pushes 0 workers, mail queues on the pod's volume (and survives
/// the container being killed), the primary comes back, replay ramps up and the queue empties
/// in arrival order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_holds_replay_then_recovery_ramps_up_and_delivers_in_order() {
    let node = node();
    let mut primary = BridgePrimary::start(node);
    primary.down();
    let s = Setup::new("outage", &primary, 1, json!({})).await;
    let pod = s.pods[0].clone();
    let admin = pod.admin(&s.token);

    eventually("PrimaryHealthy=False", Duration::from_secs(60), || async {
        (condition(&s.bmx()?, "PrimaryHealthy")?.1 == "PrimaryDown").then_some(())
    })
    .await;
    let st = s.status();
    assert_eq!(
        (
            st["replay"]["workers"].as_u64(),
            st["replay"]["reason"].as_str()
        ),
        (Some(0), Some("PrimaryDown"))
    );
    assert_eq!(st["primary"]["healthy"], false);
    assert!(st["primary"]["lastError"].as_str().is_some(), "{st}");
    let sent = send_n(pod.smtp(), "outage", 8).await;
    assert_eq!(admin.workers().await, 0, "held while the primary is down");
    assert_eq!(admin.queued().await, 8);

    // the container dies (kill -9 from the host): the kubelet restarts it on the same volume,
    // and every acknowledged message is still queued
    node.kill_container(&pod);
    let restarted = node.wait_restarted(&pod).await;
    assert_eq!(restarted.ip, pod.ip, "the same sandbox: the same pod IP");
    let admin = restarted.admin(&s.token);
    eventually("the restarted mx-pod answers", POD_TIMEOUT, || async {
        admin.try_get("/v1/queue").await.map(|_| ())
    })
    .await;
    assert_eq!(admin.queued().await, 8, "the queue survived kill -9");
    eventually("the queue in status", Duration::from_secs(90), || async {
        (s.status()["queue"]["messages"] == 8).then_some(())
    })
    .await;

    // recovery: healthy after 2 good probes, then 1 worker growing to 3 over 6 s
    primary.up();
    let mut seen: Vec<(u64, String)> = Vec::new();
    eventually("replay at full speed", Duration::from_secs(90), || {
        let st = s.status();
        let step = (
            st["replay"]["workers"].as_u64().unwrap_or(0),
            st["replay"]["reason"].as_str().unwrap_or("").to_string(),
        );
        if seen.last() != Some(&step) {
            seen.push(step.clone());
        }
        async move { (step.1 == "Full").then_some(()) }
    })
    .await;
    println!("replay steps seen: {seen:?}");
    assert!(
        seen.iter()
            .any(|(w, r)| r == "RampingUp" && *w >= 1 && *w < 3),
        "a ramp: {seen:?}"
    );
    let ramp: Vec<u64> = seen
        .iter()
        .skip_while(|(_, r)| r == "PrimaryDown")
        .map(|(w, _)| *w)
        .collect();
    assert!(
        ramp.windows(2).all(|w| w[0] <= w[1]),
        "workers only grow while healthy: {seen:?}"
    );
    eventually("3 workers in the pod", Duration::from_secs(60), || async {
        (admin.workers().await == 3).then_some(())
    })
    .await;
    admin.wait_empty(Duration::from_secs(90)).await;
    assert_eq!(
        primary.received_order(),
        sent,
        "delivered once each, in arrival order"
    );
    let b = s.bmx().unwrap();
    assert_eq!(condition(&b, "Replaying").unwrap().0, "True");
    assert_eq!(condition(&b, "PrimaryHealthy").unwrap().0, "True");
    s.done("outage");
}

/// (b) A maintenance window holds replay though the primary is up; when it closes, the queue
/// is delivered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_window_holds_replay_though_the_primary_is_up() {
    let node = node();
    let primary = BridgePrimary::start(node);
    let s = Setup::new("window", &primary, 1, json!({})).await;
    let admin = s.pods[0].admin(&s.token);
    eventually("the primary healthy", Duration::from_secs(60), || async {
        (s.status()["primary"]["healthy"] == true).then_some(())
    })
    .await;
    // the window opens now (the pods are up: its 40 s are not spent waiting for them)
    let start = chrono::Utc::now() - chrono::Duration::seconds(5);
    // a daily window 12 hours away, in Tokyo's time (UTC+9, no DST): never open during the test
    let tokyo_hour = (chrono::Utc::now() + chrono::Duration::hours(12 + 9)).format("%H");
    let nightly = format!("0 {tokyo_hour} * * *");
    s.patch(json!({"spec": {"maintenanceWindows": [
        {"start": start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "duration": "45s", "reason": "primary upgrade"},
        {"schedule": nightly, "timeZone": "Asia/Tokyo", "duration": "1h", "reason": "nightly backup"}
    ]}}));
    let st = eventually(
        "MaintenanceWindow with a healthy primary",
        Duration::from_secs(60),
        || async {
            let st = s.status();
            (st["replay"]["reason"] == "MaintenanceWindow" && st["primary"]["healthy"] == true)
                .then_some(st)
        },
    )
    .await;
    assert_eq!(st["maintenance"]["active"], true);
    assert_eq!(st["maintenance"]["reason"], "primary upgrade");
    assert_eq!(st["maintenance"]["nextReason"], "nightly backup", "{st}");
    eventually("0 workers in the pod", Duration::from_secs(30), || async {
        (admin.workers().await == 0).then_some(())
    })
    .await;
    let sent = send_n(s.pods[0].smtp(), "window", 3).await;
    // while the window is open: held
    let st = s.status();
    assert_eq!(
        st["maintenance"]["active"], true,
        "the window is still open: {st}"
    );
    assert_eq!(admin.workers().await, 0);
    assert_eq!(admin.queued().await, 3);
    assert!(primary.received_order().is_empty());
    // it closes: replay ramps up from one worker (the primary was just upgraded), delivers
    eventually(
        "the window to close and replay to ramp up",
        Duration::from_secs(90),
        || async {
            let st = s.status();
            (st["maintenance"]["active"] == false && st["replay"]["reason"] == "RampingUp")
                .then_some(())
        },
    )
    .await;
    admin.wait_empty(Duration::from_secs(90)).await;
    assert_eq!(primary.received_order(), sent);
    s.done("maintenance window");
}

/// (c) Cutover: spec.primary changes; the StatefulSet rolls (the kubelet replaces the pod, the
/// volume stays); the old pod never gets workers, nothing reaches the old primary after the
/// change, and the queue goes to the new primary in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_sends_queued_mail_to_the_new_primary_only() {
    let node = node();
    let mut old = BridgePrimary::start(node);
    let new = BridgePrimary::start(node);
    old.down();
    let s = Setup::new("cutover", &old, 1, json!({})).await;
    let before = s.pods[0].clone();
    let sent = send_n(before.smtp(), "cutover", 4).await;
    s.wait_reason("PrimaryDown").await;

    // the migration: the spec names the new primary; the old one comes back meanwhile
    s.patch(json!({"spec": {"primary": {"port": new.port()}}}));
    eventually(
        "the new target in status",
        Duration::from_secs(60),
        || async { (s.status()["primary"]["target"] == new.addr().to_string()).then_some(()) },
    )
    .await;
    old.up();
    // while the pod of the old configuration runs, it has no workers, whatever the probe says
    let old_admin = before.admin(&s.token);
    let checks = AtomicUsize::new(0);
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(node.client().await, &s.ns);
    eventually("the old pod to be replaced", POD_TIMEOUT, || async {
        let current = pods.get_opt(&before.name).await.ok()?;
        if let Some((200, r)) = old_admin.try_get("/v1/replay").await {
            assert_eq!(
                r["workers"], 0,
                "a pod with the old primary gets no workers"
            );
            checks.fetch_add(1, Ordering::SeqCst);
        }
        let replaced = match current {
            None => true,
            Some(p) => p.metadata.uid.as_deref() != Some(before.uid.as_str()),
        };
        replaced.then_some(())
    })
    .await;
    let checks = checks.into_inner();
    // (the StatefulSet usually replaces the pod before the operator has even reported the
    // new target, so the old pod is often gone before it can be asked)
    println!("old pod asked {checks} time(s) while it ran: 0 workers each time");
    assert!(
        old.received_order().is_empty(),
        "nothing reaches the old primary"
    );

    let after = node
        .ready_pod(&s.ns, &before.name, Some(&before.uid), POD_TIMEOUT)
        .await;
    let admin = after.admin(&s.token);
    admin.wait_empty(Duration::from_secs(120)).await;
    assert_eq!(
        new.received_order(),
        sent,
        "every queued message at the new primary, in order"
    );
    assert!(old.received_order().is_empty(), "and none at the old one");
    s.done("cutover");
}

/// (d) Scale 3 -> 2 with mail on pod 2 (and pod 0) while the primary is down: pod 2 drains
/// into pod 0 before the StatefulSet shrinks; when the primary returns, every message arrives
/// exactly once, each pod's mail in its arrival order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_the_removed_pod_first_and_loses_nothing() {
    let node = node();
    let mut primary = BridgePrimary::start(node);
    primary.down();
    let s = Setup::new("scale", &primary, 3, json!({})).await;
    let on_2 = send_n(s.pods[2].smtp(), "pod2", 4).await;
    let on_0 = send_n(s.pods[0].smtp(), "pod0", 2).await;
    let admin0 = s.pods[0].admin(&s.token);
    let admin2 = s.pods[2].admin(&s.token);
    assert_eq!(admin2.queued().await, 4);
    s.wait_reason("PrimaryDown").await;

    s.patch(json!({"spec": {"replicas": 2}}));
    // pod 2 drains into pod 0 (the primary is down), then the StatefulSet shrinks
    let b = eventually("Draining=True", Duration::from_secs(60), || async {
        let b = s.bmx()?;
        (condition(&b, "Draining")?.0 == "True").then_some(b)
    })
    .await;
    assert!(
        condition(&b, "Draining").unwrap().2.contains("example-2"),
        "{b}"
    );
    eventually(
        "the StatefulSet scaled to 2",
        Duration::from_secs(120),
        || async {
            (s.node.get(&s.ns, "statefulset/example")?["spec"]["replicas"] == 2).then_some(())
        },
    )
    .await;
    assert_eq!(admin0.queued().await, 6, "pod 2's mail is on pod 0 now");
    assert!(s.events().contains("ScaledDown"));
    // the kubelet stops pod 2; its claim (and volume) stay
    node.pod_gone(&s.ns, "example-2", &s.pods[2].uid, POD_TIMEOUT)
        .await;
    assert!(
        s.node
            .get(&s.ns, "persistentvolumeclaim/queue-example-2")
            .is_some(),
        "pod 2's claim is kept"
    );
    // the primary comes back: everything arrives exactly once
    primary.up();
    admin0.wait_empty(Duration::from_secs(120)).await;
    let got = primary.received_order();
    let mut sorted = got.clone();
    sorted.sort();
    let mut want: Vec<String> = on_2.iter().chain(&on_0).cloned().collect();
    want.sort();
    assert_eq!(sorted, want, "zero loss, no duplicates");
    let of = |tag: &str| with_tag(&got, tag);
    assert_eq!(of("pod2"), on_2, "pod 2's mail in its arrival order");
    assert_eq!(of("pod0"), on_0, "pod 0's mail in its arrival order");
    s.done("scale-down");
}

/// (e) Alerts: one PrimaryDown and one PrimaryRecovered reach a local webhook, however many
/// passes run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_the_webhook_once_per_change() {
    let hook = Webhook::start().await;

    let node = node();
    let mut primary = BridgePrimary::start(node);
    let relay = backupmx_tests::Sink::start(&[], 0, true).await;
    // the webhook speaks HTTPS with a test CA's certificate: the BackupMx trusts that CA
    let s = Setup::new_with(
        "alerts",
        &primary,
        1,
        json!({"alerts": {"webhookUrl": hook.url,
                          "email": "oncall@ops.test", "smtpRelay": relay.addr()},
               "caBundle": {"secretName": "alerts-ca"}}),
        false,
        |ns, _| node.apply(Some(ns), &hook.ca_secret("alerts-ca")),
    )
    .await;
    eventually("the primary healthy", Duration::from_secs(60), || async {
        (s.status()["primary"]["healthy"] == true).then_some(())
    })
    .await;
    primary.down();
    hook.wait_for("PrimaryDown").await;
    primary.up();
    hook.wait_for("PrimaryRecovered").await;
    // a few more passes (an annotation triggers each) change nothing
    for poke in 0..3 {
        let passes = s.op.reconciles(&s.ns, "example").await;
        s.node.kubectl_ok(&[
            "-n",
            &s.ns,
            "annotate",
            "bmx/example",
            &format!("test/poke={poke}"),
            "--overwrite",
        ]);
        eventually("another pass", Duration::from_secs(60), || async {
            (s.op.reconciles(&s.ns, "example").await > passes).then_some(())
        })
        .await;
    }
    hook.assert_one_down_and_one_up(&format!("{}/example", s.ns));
    relay
        .expect_alert_mails(
            &format!("{}/example", s.ns),
            "oncall@ops.test",
            &["PrimaryDown", "PrimaryRecovered"],
        )
        .await;
    let events = s.events();
    assert!(
        events.contains("PrimaryDown") && events.contains("PrimaryRecovered"),
        "{events}"
    );
    s.done("alerts");
}

/// (f) The failover drill: a held test message queued in a pod, released, followed to the
/// primary: passes with a healthy primary, fails (replay held) with a dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_passes_with_a_healthy_primary_and_fails_with_a_dead_one() {
    let node = node();
    let mut primary = BridgePrimary::start(node);
    let s = Setup::new("drill", &primary, 1, json!({})).await;
    eventually("replay running", Duration::from_secs(60), || async {
        (s.status()["replay"]["workers"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;

    // the command line: annotates, waits, prints, exit status
    let out = std::process::Command::new(operator_bin())
        .args(["drill", "example", "-n", &s.ns, "--timeout", "90s"])
        .env("KUBECONFIG", node.cluster.kubeconfig())
        .output()
        .unwrap();
    let out_text = text(&out);
    assert!(out.status.success(), "{out_text}");
    assert!(
        out_text.contains("Passed") && out_text.contains("accepted by the primary"),
        "{out_text}"
    );
    let drills: Vec<Vec<u8>> = primary
        .delivered()
        .into_iter()
        .filter(|m| String::from_utf8_lossy(m).contains("backupmx failover drill"))
        .collect();
    assert_eq!(
        drills.len(),
        1,
        "the test message reached the primary's postmaster"
    );
    assert!(seq_of(&drills[0]).is_none());

    primary.down();
    s.wait_reason("PrimaryDown").await;
    s.node.kubectl_ok(&[
        "-n",
        &s.ns,
        "annotate",
        "bmx/example",
        "backupmx.io/drill=second",
        "--overwrite",
    ]);
    let d = eventually("the drill's verdict", Duration::from_secs(90), || async {
        let d = s.status()["drill"].clone();
        (d["request"] == "second" && d["result"] != "Running").then_some(d)
    })
    .await;
    assert_eq!(d["result"], "Failed", "{d}");
    assert!(
        d["message"].as_str().unwrap().contains("replay is held"),
        "{d}"
    );
    let events = s.events();
    assert!(
        events.contains("DrillPassed") && events.contains("DrillFailed"),
        "{events}"
    );
    s.done("drill");
}
