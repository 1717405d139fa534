//! The operator drives replay from the primary's health: outage and recovery with a ramp, a
//! maintenance window, backoff when the primary says `421`, a cutover, a scale-down drain,
//! alerts to a webhook (over HTTPS, its CA in `spec.caBundle`), the failover drill.
//!
//! The primaries are real Postfix instances (smtp-sink for the one that answers `421`); each pod of the StatefulSet is played by a real
//! mx-pod on the pod's IP (127.0.0.0/8, SMTP on 2525 and admin on 8025 as in the rendered
//! config), with the test acting as the kubelet.

use std::time::Duration;

use backupmx_tests::{
    MxPod, MxPodConfig, Primary, Sink,
    kube::{Cluster, Operator, ca_bundle_secret, cluster, condition, eventually, run_pod},
    message, send, seq_of,
    webhook::Webhook,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::DeleteParams};
use serde_json::{Value, json};
use testkit::TestCa;

fn get(cluster: &Cluster, ns: &str, what: &str) -> Option<Value> {
    let out = cluster.kubectl(&["-n", ns, "get", what, "-o", "json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn apply(cluster: &Cluster, ns: &str, obj: &Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("obj.json");
    std::fs::write(&file, obj.to_string()).unwrap();
    cluster.kubectl_ok(&["-n", ns, "apply", "-f", &file.to_string_lossy()]);
}

fn patch(cluster: &Cluster, ns: &str, patch: Value) {
    cluster.kubectl_ok(&[
        "-n",
        ns,
        "patch",
        "bmx/example",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
}

/// A BackupMx for example.test whose primary is `primary`, probed every second.
fn backupmx(primary_port: u16, replicas: i32, extra: Value) -> Value {
    let mut spec = json!({
        "domains": ["example.test"], "replicas": replicas, "deletionPolicy": "Orphan",
        "primary": {"host": "127.0.0.1", "port": primary_port,
                    "healthCheck": {"interval": "1s", "timeout": "1s", "failureThreshold": 2, "successThreshold": 2}},
        "storage": {"size": "1Gi"}, "mx": {"hostname": "mx2.example.test"},
        "replay": {"maxWorkers": 3, "ratePerSecond": 2, "rampUp": "6s"},
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    json!({"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
           "metadata": {"name": "example"}, "spec": spec})
}

/// The StatefulSet's pods, played by real mx-pods at `127.0.0.{ip_base + ordinal}`.
struct Pods {
    pods: Vec<Option<MxPod>>,
    /// Replaced pods' processes: kept (stopped) because their directory holds the volume.
    retired: Vec<MxPod>,
    ips: Vec<String>,
    token: String,
}

impl Pods {
    async fn start(
        cluster: &Cluster,
        ns: &str,
        replicas: usize,
        ip_base: u8,
        primary: &str,
    ) -> Pods {
        let client = cluster.client().await;
        let token = backupmx_tests::kube::admin_token(&client, ns, "example").await;
        let mut me = Pods {
            pods: Vec::new(),
            retired: Vec::new(),
            ips: Vec::new(),
            token,
        };
        for i in 0..replicas {
            me.ips.push(format!("127.0.0.{}", ip_base as usize + i));
            me.pods.push(None);
            me.run(cluster, ns, i, primary).await;
        }
        me
    }

    /// Starts (or restarts) the mx-pod of pod `i` against `primary` and marks the pod running.
    async fn run(&mut self, cluster: &Cluster, ns: &str, i: usize, primary: &str) {
        let client = cluster.client().await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let name = format!("example-{i}");
        eventually(&format!("pod {name}"), Duration::from_secs(90), || async {
            pods.get_opt(&name)
                .await
                .ok()?
                .filter(|p| p.metadata.deletion_timestamp.is_none())
        })
        .await;
        let mut cfg = MxPodConfig::new(primary);
        cfg.ip = self.ips[i].parse().unwrap();
        cfg.admin_port = Some(backupmx_operator::render::ADMIN_PORT);
        cfg.smtp_port = Some(backupmx_operator::render::SMTP_PORT);
        cfg.token = Some(self.token.clone());
        cfg.workers = 0; // as rendered: the operator decides
        cfg.rate = 2;
        let pod = match self.pods[i].take() {
            // the same volume: the queue survives the pod's replacement
            Some(mut old) => {
                old.kill9();
                let dir = old.queue_dir.clone();
                self.retired.push(old);
                MxPod::start_with_queue_dir(backupmx_tests::state_dir("mxpod"), dir, cfg).await
            }
            None => MxPod::start(cfg).await,
        };
        self.pods[i] = Some(pod);
        run_pod(&client, ns, &name, &self.ips[i]).await;
    }

    fn pod(&self, i: usize) -> &MxPod {
        self.pods[i].as_ref().expect("running")
    }

    async fn workers(&self, i: usize) -> u64 {
        let (_, r) = self.pod(i).get("/v1/replay").await;
        r["workers"].as_u64().unwrap_or(0)
    }
}

async fn send_n(pod: &MxPod, tag: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let r = send(
            pod.smtp,
            "sender@sender.test",
            &["user@example.test"],
            &message(tag, i, 300),
        )
        .await
        .unwrap();
        assert!(r.ok(), "{r:?}");
        ids.push(format!("{tag}.{i}@test"));
    }
    ids
}

fn status(cluster: &Cluster, ns: &str) -> Value {
    get(cluster, ns, "bmx/example")
        .map(|b| b["status"].clone())
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_holds_replay_then_recovery_ramps_up_and_delivers_in_order() {
    let cluster = cluster();
    let ns = cluster.namespace("outage").await;
    let mut primary = Primary::start();
    primary.down();
    let port: u16 = primary.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let _op = Operator::start(
        cluster,
        "op-outage",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    apply(cluster, &ns, &backupmx(port, 1, json!({})));
    let pods = Pods::start(cluster, &ns, 1, 101, &primary.addr()).await;

    eventually("PrimaryHealthy=False", Duration::from_secs(60), || async {
        let b = get(cluster, &ns, "bmx/example")?;
        (condition(&b, "PrimaryHealthy")?.1 == "PrimaryDown").then_some(())
    })
    .await;
    let s = status(cluster, &ns);
    assert_eq!(
        (
            s["replay"]["workers"].as_u64(),
            s["replay"]["reason"].as_str()
        ),
        (Some(0), Some("PrimaryDown"))
    );
    assert_eq!(s["primary"]["healthy"], false);
    assert!(s["primary"]["lastError"].as_str().is_some(), "{s}");
    let sent = send_n(pods.pod(0), "outage", 8).await;
    assert_eq!(pods.workers(0).await, 0, "held while the primary is down");
    eventually("the queue in status", Duration::from_secs(60), || async {
        (status(cluster, &ns)["queue"]["messages"] == 8).then_some(())
    })
    .await;

    // recovery: healthy after 2 good probes, then 1 worker growing to 3 over 6 s
    primary.up();
    let mut seen = Vec::new();
    eventually("replay at full speed", Duration::from_secs(90), || {
        let s = status(cluster, &ns);
        let step = (
            s["replay"]["workers"].as_u64().unwrap_or(0),
            s["replay"]["reason"].as_str().unwrap_or("").to_string(),
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
    assert_eq!(pods.workers(0).await, 3);
    pods.pod(0).wait_empty(Duration::from_secs(60)).await;
    let order = primary.received_order();
    assert_eq!(order, sent, "delivered once each, in arrival order");
    let b = get(cluster, &ns, "bmx/example").unwrap();
    assert_eq!(condition(&b, "Replaying").unwrap().0, "True");
    assert_eq!(condition(&b, "PrimaryHealthy").unwrap().0, "True");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_window_holds_replay_though_the_primary_is_up() {
    let cluster = cluster();
    let ns = cluster.namespace("window").await;
    let primary = Primary::start();
    let port: u16 = primary.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let _op = Operator::start(
        cluster,
        "op-window",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    apply(cluster, &ns, &backupmx(port, 1, json!({})));
    let pods = Pods::start(cluster, &ns, 1, 111, &primary.addr()).await;
    eventually("the primary healthy", Duration::from_secs(60), || async {
        (status(cluster, &ns)["primary"]["healthy"] == true).then_some(())
    })
    .await;
    // the window opens now (the operator and pods are up: its 45 s are not spent waiting for
    // them); a daily window 12 hours away, in Tokyo's time (UTC+9, no DST), is the next one
    let start = chrono::Utc::now() - chrono::Duration::seconds(5);
    let tokyo_hour = (chrono::Utc::now() + chrono::Duration::hours(12 + 9)).format("%H");
    let nightly = format!("0 {tokyo_hour} * * *");
    patch(
        cluster,
        &ns,
        json!({"spec": {"maintenanceWindows": [
            {"start": start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "duration": "45s", "reason": "primary upgrade"},
            {"schedule": nightly, "timeZone": "Asia/Tokyo", "duration": "1h", "reason": "nightly backup"}
        ]}}),
    );
    let s = eventually(
        "MaintenanceWindow with a healthy primary",
        Duration::from_secs(60),
        || async {
            let s = status(cluster, &ns);
            (s["replay"]["reason"] == "MaintenanceWindow" && s["primary"]["healthy"] == true)
                .then_some(s)
        },
    )
    .await;
    assert_eq!(s["maintenance"]["active"], true);
    assert_eq!(s["maintenance"]["reason"], "primary upgrade");
    assert_eq!(s["maintenance"]["nextReason"], "nightly backup", "{s}");
    let sent = send_n(pods.pod(0), "window", 3).await;
    // while the window is open: held
    let s = status(cluster, &ns);
    assert_eq!(
        s["maintenance"]["active"], true,
        "the window is still open: {s}"
    );
    assert_eq!(pods.workers(0).await, 0);
    assert!(primary.received_order().is_empty());
    // it closes: replay ramps up from one worker (the primary was just upgraded), delivers
    eventually(
        "the window to close and replay to ramp up",
        Duration::from_secs(60),
        || async {
            let st = status(cluster, &ns);
            (st["maintenance"]["active"] == false && st["replay"]["reason"] == "RampingUp")
                .then_some(())
        },
    )
    .await;
    pods.pod(0).wait_empty(Duration::from_secs(60)).await;
    assert_eq!(primary.received_order(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifting_the_pause_ramps_replay_up_again() {
    let cluster = cluster();
    let ns = cluster.namespace("pause").await;
    let primary = Primary::start();
    let port: u16 = primary.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let _op = Operator::start(
        cluster,
        "op-pause",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    let replay = json!({"replay": {"maxWorkers": 3, "ratePerSecond": 2, "rampUp": "12s"}});
    apply(cluster, &ns, &backupmx(port, 1, replay));
    let pods = Pods::start(cluster, &ns, 1, 161, &primary.addr()).await;
    // healthy for longer than rampUp: full speed
    eventually("replay at full speed", Duration::from_secs(60), || async {
        (status(cluster, &ns)["replay"]["reason"] == "Full").then_some(())
    })
    .await;
    patch(cluster, &ns, json!({"spec": {"replay": {"paused": true}}}));
    eventually("replay paused", Duration::from_secs(60), || async {
        (status(cluster, &ns)["replay"]["reason"] == "Paused").then_some(())
    })
    .await;
    eventually(
        "the pod holds its mail",
        Duration::from_secs(30),
        || async { (pods.workers(0).await == 0).then_some(()) },
    )
    .await;
    let sent = send_n(pods.pod(0), "paused", 3).await;
    assert!(primary.received_order().is_empty(), "held while paused");
    // lifted: the primary has been healthy all along, yet replay starts again from one worker
    patch(cluster, &ns, json!({"spec": {"replay": {"paused": false}}}));
    let st = eventually("replay resumed", Duration::from_secs(60), || async {
        let st = status(cluster, &ns);
        (st["replay"]["reason"] != "Paused").then_some(st)
    })
    .await;
    assert_eq!(st["replay"]["reason"], "RampingUp", "{st}");
    assert!(st["replay"]["workers"].as_u64() < Some(3), "{st}");
    assert!(st["replay"]["resumedAt"].is_string(), "{st}");
    eventually("full speed again", Duration::from_secs(60), || async {
        (status(cluster, &ns)["replay"]["reason"] == "Full").then_some(())
    })
    .await;
    pods.pod(0).wait_empty(Duration::from_secs(60)).await;
    assert_eq!(primary.received_order(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_sends_queued_mail_to_the_new_primary_only() {
    let cluster = cluster();
    let ns = cluster.namespace("cutover").await;
    let mut old = Primary::start();
    let new = Primary::start();
    old.down();
    let old_port: u16 = old.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let new_port: u16 = new.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let op = Operator::start(
        cluster,
        "op-cutover",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    apply(cluster, &ns, &backupmx(old_port, 1, json!({})));
    let mut pods = Pods::start(cluster, &ns, 1, 121, &old.addr()).await;
    let sent = send_n(pods.pod(0), "cutover", 4).await;
    eventually("PrimaryDown", Duration::from_secs(60), || async {
        (status(cluster, &ns)["replay"]["reason"] == "PrimaryDown").then_some(())
    })
    .await;

    // the migration: the spec names the new primary; the old one comes back meanwhile
    patch(
        cluster,
        &ns,
        json!({"spec": {"primary": {"port": new_port}}}),
    );
    eventually(
        "the new target in status",
        Duration::from_secs(60),
        || async {
            (status(cluster, &ns)["primary"]["target"] == format!("127.0.0.1:{new_port}"))
                .then_some(())
        },
    )
    .await;
    old.up();
    // the pod still runs the old configuration: it gets no workers, whatever the probe says
    let passes = op.reconciles(&ns, "example").await;
    eventually("two more passes", Duration::from_secs(60), || async {
        (op.reconciles(&ns, "example").await >= passes + 2).then_some(())
    })
    .await;
    assert_eq!(
        pods.workers(0).await,
        0,
        "a pod with the old primary gets no workers"
    );
    assert!(
        old.received_order().is_empty(),
        "nothing reaches the old primary"
    );

    // the rolling update replaces the pod (the test plays the kubelet: same volume, new config)
    let client = cluster.client().await;
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    api.delete("example-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    pods.run(cluster, &ns, 0, &new.addr()).await;
    pods.pod(0).wait_empty(Duration::from_secs(90)).await;
    assert_eq!(
        new.received_order(),
        sent,
        "every queued message at the new primary, in order"
    );
    assert!(old.received_order().is_empty(), "and none at the old one");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_the_removed_pod_first_and_loses_nothing() {
    let cluster = cluster();
    let ns = cluster.namespace("scale").await;
    let mut primary = Primary::start();
    primary.down();
    let port: u16 = primary.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let _op = Operator::start(
        cluster,
        "op-scale",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    apply(cluster, &ns, &backupmx(port, 3, json!({})));
    let pods = Pods::start(cluster, &ns, 3, 131, &primary.addr()).await;
    let on_2 = send_n(pods.pod(2), "pod2", 4).await;
    let on_0 = send_n(pods.pod(0), "pod0", 2).await;
    eventually("PrimaryDown", Duration::from_secs(60), || async {
        (status(cluster, &ns)["replay"]["reason"] == "PrimaryDown").then_some(())
    })
    .await;

    patch(cluster, &ns, json!({"spec": {"replicas": 2}}));
    // pod 2 drains into pod 0 (the primary is down), then the StatefulSet shrinks
    let b = eventually("Draining=True", Duration::from_secs(60), || async {
        let b = get(cluster, &ns, "bmx/example")?;
        (condition(&b, "Draining")?.0 == "True").then_some(b)
    })
    .await;
    assert!(
        condition(&b, "Draining").unwrap().2.contains("example-2"),
        "{b}"
    );
    eventually(
        "the StatefulSet scaled to 2",
        Duration::from_secs(90),
        || async {
            (get(cluster, &ns, "statefulset/example")?["spec"]["replicas"] == 2).then_some(())
        },
    )
    .await;
    assert_eq!(
        pods.pod(2).queued().await,
        0,
        "pod 2 is empty before it goes"
    );
    assert_eq!(pods.pod(0).queued().await, 6, "its mail is on pod 0 now");
    let (_, q2) = pods.pod(2).get("/v1/queue").await;
    assert_eq!(q2["draining"], true);
    let events = cluster.kubectl_ok(&["-n", &ns, "get", "events.v1.events.k8s.io", "-o", "json"]);
    assert!(events.contains("ScaledDown"), "{events}");
    // the primary comes back: everything arrives exactly once
    primary.up();
    pods.pod(0).wait_empty(Duration::from_secs(90)).await;
    let mut got: Vec<String> = primary.received_order();
    got.sort();
    let mut want: Vec<String> = on_2.into_iter().chain(on_0).collect();
    want.sort();
    assert_eq!(got, want, "zero loss, no duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_the_webhook_once_per_change() {
    let hook = Webhook::start().await;

    let cluster = cluster();
    let ns = cluster.namespace("alerts").await;
    let mut primary = Primary::start();
    let pport: u16 = primary.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let op = Operator::start(
        cluster,
        "op-alerts",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    let relay = backupmx_tests::Sink::start(&[], 0, true).await;
    // the webhook speaks HTTPS with a test CA's certificate: the BackupMx trusts that CA
    apply(cluster, &ns, &hook.ca_secret("alerts-ca"));
    apply(
        cluster,
        &ns,
        &backupmx(
            pport,
            1,
            json!({"alerts": {"webhookUrl": hook.url,
                              "email": "oncall@ops.test", "smtpRelay": relay.addr()},
                   "caBundle": {"secretName": "alerts-ca"}}),
        ),
    );
    let _pods = Pods::start(cluster, &ns, 1, 141, &primary.addr()).await;
    eventually("the primary healthy", Duration::from_secs(60), || async {
        (status(cluster, &ns)["primary"]["healthy"] == true).then_some(())
    })
    .await;
    primary.down();
    hook.wait_for("PrimaryDown").await;
    primary.up();
    hook.wait_for("PrimaryRecovered").await;
    // a few more passes (an annotation triggers each) change nothing
    for poke in 0..3 {
        let passes = op.reconciles(&ns, "example").await;
        cluster.kubectl_ok(&[
            "-n",
            &ns,
            "annotate",
            "bmx/example",
            &format!("test/poke={poke}"),
            "--overwrite",
        ]);
        eventually("another pass", Duration::from_secs(60), || async {
            (op.reconciles(&ns, "example").await > passes).then_some(())
        })
        .await;
    }
    hook.assert_one_down_and_one_up(&format!("{ns}/example"));
    relay
        .expect_alert_mails(
            &format!("{ns}/example"),
            "oncall@ops.test",
            &["PrimaryDown", "PrimaryRecovered"],
        )
        .await;
    let events = cluster.kubectl_ok(&["-n", &ns, "get", "events.v1.events.k8s.io", "-o", "json"]);
    assert!(
        events.contains("PrimaryDown") && events.contains("PrimaryRecovered"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_with_a_certificate_from_an_unknown_ca_gets_nothing_and_the_cause_is_logged() {
    // the webhook's certificate comes from a CA the BackupMx's bundle does not hold
    let hook = Webhook::start_with(
        &TestCa::new("a CA the operator is not told about").issue(&["127.0.0.1", "localhost"]),
    )
    .await;
    let trusted = TestCa::new("the CA in spec.caBundle");

    let cluster = cluster();
    let ns = cluster.namespace("alerttls").await;
    apply(cluster, &ns, &ca_bundle_secret("alerts-ca", &trusted.pem()));
    let op = Operator::start(
        cluster,
        "op-alerttls",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    // nothing listens at the primary's port: the operator's probe finds it down, PrimaryDown
    // is raised and sent to the webhook
    let dead = backupmx_tests::free_port();
    apply(
        cluster,
        &ns,
        &backupmx(
            dead,
            1,
            json!({"alerts": {"webhookUrl": hook.url},
                   "caBundle": {"secretName": "alerts-ca"}}),
        ),
    );
    let line = eventually(
        "the failed webhook call in the operator's log",
        Duration::from_secs(60),
        || async {
            op.log_text()
                .lines()
                .find(|l| l.contains("alert not delivered to the webhook"))
                .map(str::to_owned)
        },
    )
    .await;
    assert!(line.contains(&hook.url), "the URL is logged: {line}");
    assert!(line.contains("PrimaryDown"), "the alert is logged: {line}");
    assert!(
        line.contains("invalid peer certificate: UnknownIssuer"),
        "the certificate problem is logged: {line}"
    );
    assert!(line.contains("WARN"), "a warning: {line}");
    eventually(
        "the refused handshake at the webhook",
        Duration::from_secs(10),
        || async { (hook.failed_handshakes() > 0).then_some(()) },
    )
    .await;
    assert!(hook.received().is_empty(), "{:?}", hook.received());
    let events = cluster.kubectl_ok(&["-n", &ns, "get", "events.v1.events.k8s.io", "-o", "json"]);
    assert!(
        events.contains("AlertNotDelivered") && events.contains("UnknownIssuer"),
        "{events}"
    );
}

/// Turns on STARTTLS (`smtpd_tls_security_level = may`, a test CA's certificate, the TLS details
/// in the `Received:` header) on a running Postfix `relay`, and waits until it offers it.
async fn offer_starttls(relay: &Primary) {
    let (cert, key) = TestCa::new("relay test CA")
        .issue(&["127.0.0.1", "localhost"])
        .write(&relay.dir.path().join("etc"));
    relay.enable_tls(&cert, &key, "may").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_email_goes_over_starttls_when_the_relay_offers_it() {
    let relay = Primary::start();
    offer_starttls(&relay).await;

    let cluster = cluster();
    let ns = cluster.namespace("alertmail").await;
    let _op = Operator::start(
        cluster,
        "op-alertmail",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    // nothing listens at the primary's port: PrimaryDown is raised and mailed through the relay
    let dead = backupmx_tests::free_port();
    apply(
        cluster,
        &ns,
        &backupmx(
            dead,
            1,
            json!({"alerts": {"email": "oncall@example.test", "smtpRelay": relay.addr()}}),
        ),
    );
    let subject = format!("[backupmx {ns}/example] PrimaryDown");
    let mail = eventually(
        "the alert email at the relay",
        Duration::from_secs(60),
        || async {
            relay
                .delivered()
                .into_iter()
                .map(|m| String::from_utf8_lossy(&m).into_owned())
                .find(|m| m.contains(&subject))
        },
    )
    .await;
    let received = mail
        .lines()
        .skip_while(|l| !l.starts_with("Received:"))
        .take_while(|l| l.starts_with("Received:") || l.starts_with(char::is_whitespace))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        received.contains("using TLS"),
        "the relay received it over TLS: {received}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_passes_with_a_healthy_primary_and_fails_with_a_dead_one() {
    let cluster = cluster();
    let ns = cluster.namespace("drill").await;
    let mut primary = Primary::start();
    let port: u16 = primary.addr().rsplit_once(':').unwrap().1.parse().unwrap();
    let _op = Operator::start(
        cluster,
        "op-drill",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    apply(cluster, &ns, &backupmx(port, 1, json!({})));
    let _pods = Pods::start(cluster, &ns, 1, 151, &primary.addr()).await;
    eventually("replay running", Duration::from_secs(60), || async {
        let s = status(cluster, &ns);
        (s["replay"]["workers"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;

    // the command line: annotates, waits, prints, exit status
    let out = std::process::Command::new(backupmx_tests::kube::operator_bin())
        .args(["drill", "example", "-n", &ns, "--timeout", "90s"])
        .env("KUBECONFIG", cluster.kubeconfig())
        .output()
        .unwrap();
    let text = backupmx_tests::kube::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("Passed") && text.contains("accepted by the primary"),
        "{text}"
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
    eventually("PrimaryDown", Duration::from_secs(60), || async {
        (status(cluster, &ns)["replay"]["reason"] == "PrimaryDown").then_some(())
    })
    .await;
    cluster.kubectl_ok(&[
        "-n",
        &ns,
        "annotate",
        "bmx/example",
        "backupmx.io/drill=second",
        "--overwrite",
    ]);
    let d = eventually("the drill's verdict", Duration::from_secs(90), || async {
        let d = status(cluster, &ns)["drill"].clone();
        (d["request"] == "second" && d["result"] != "Running").then_some(d)
    })
    .await;
    assert_eq!(d["result"], "Failed", "{d}");
    assert!(
        d["message"].as_str().unwrap().contains("replay is held"),
        "{d}"
    );
    let events = cluster.kubectl_ok(&["-n", &ns, "get", "events.v1.events.k8s.io", "-o", "json"]);
    assert!(
        events.contains("DrillPassed") && events.contains("DrillFailed"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_answering_421_backs_the_workers_off_until_it_takes_mail_again() {
    let cluster = cluster();
    let ns = cluster.namespace("backoff").await;
    // healthy to the probe (220, EHLO, QUIT) but `421` and a hang-up at MAIL FROM
    let busy = Sink::start(&["-Q", "mail"], 0, false).await;
    let port = busy.port;
    let _op = Operator::start(
        cluster,
        "op-backoff",
        &["--namespace", &ns, "--leader-elect=false"],
    );
    let replay = json!({"replay": {"maxWorkers": 4, "ratePerSecond": 5, "rampUp": "1s"}});
    apply(cluster, &ns, &backupmx(port, 1, replay));
    let pods = Pods::start(cluster, &ns, 1, 171, &busy.addr()).await;
    eventually("the primary healthy", Duration::from_secs(60), || async {
        (status(cluster, &ns)["primary"]["healthy"] == true).then_some(())
    })
    .await;
    let sent = send_n(pods.pod(0), "backoff", 4).await;

    // the pod reports the 421s; the operator halves the workers and says why (during the 1 s
    // ramp half of 1 is still 1; once ramped, half of 4)
    let s = eventually(
        "replay reason Backoff with 2 of 4 workers",
        Duration::from_secs(60),
        || async {
            let s = status(cluster, &ns);
            (s["replay"]["reason"] == "Backoff" && s["replay"]["workers"] == 2).then_some(s)
        },
    )
    .await;
    assert!(
        s["replay"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("421")),
        "{s}"
    );
    eventually(
        "2 workers pushed to the pod",
        Duration::from_secs(30),
        || async { (pods.workers(0).await == 2).then_some(()) },
    )
    .await;
    assert_eq!(pods.pod(0).queued().await, 4, "deferred, not lost");

    // the primary takes mail again on the same port: delivered in order, back to full speed
    busy.stop();
    let sink = Sink::start(&[], port, true).await;
    pods.pod(0).wait_empty(Duration::from_secs(60)).await;
    let got: Vec<String> = sink
        .dumped()
        .iter()
        .map(|(_, m)| {
            let seq = seq_of(m).expect("X-Seq");
            format!("backoff.{seq}@test")
        })
        .collect();
    let mut unique = got.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "each message once: {got:?}");
    let mut want = sent.clone();
    want.sort();
    assert_eq!(unique, want);
    eventually("replay reason Full", Duration::from_secs(60), || async {
        let s = status(cluster, &ns);
        (s["replay"]["reason"] == "Full" && s["replay"]["workers"] == 4).then_some(())
    })
    .await;
}
