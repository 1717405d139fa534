//! The operator drives replay from the primary's health. The shared scenarios of
//! [`backupmx_tests::scenarios`] (outage and ramp, a cron maintenance window, cutover,
//! scale-down drain, alerts, the failover drill) run here on [`ApiTier`]: the real API server
//! and controller manager, each pod a real mx-pod on the pod's IP (127.0.0.0/8, SMTP on 2525
//! and admin on 8025 as rendered), the test playing the kubelet. `tests/node` runs the same
//! scenarios on the real node.
//!
//! This tier's own tests: lifting a pause, a primary answering `421`, and the alert channels'
//! TLS (a webhook with an unknown CA, the alert email over STARTTLS).

use std::time::Duration;

use backupmx_tests::{
    Primary, Sink,
    kube::{ApiDeployment, ApiTier, Cluster, Operator, ca_bundle_secret, cluster, eventually},
    scenarios::{self, Deployment, Tier},
    send_n, seq_of,
    webhook::Webhook,
};
use serde_json::json;
use testkit::TestCa;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_holds_replay_then_recovery_ramps_up_and_delivers_in_order() {
    scenarios::outage(&ApiTier { ip_base: 101 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintenance_window_holds_replay_though_the_primary_is_up() {
    scenarios::maintenance_window(&ApiTier { ip_base: 111 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutover_sends_queued_mail_to_the_new_primary_only() {
    scenarios::cutover(&ApiTier { ip_base: 121 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_drains_the_removed_pod_first_and_loses_nothing() {
    scenarios::scale_down(&ApiTier { ip_base: 131 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_the_webhook_once_per_change() {
    scenarios::alerts(&ApiTier { ip_base: 141 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drill_passes_with_a_healthy_primary_and_fails_with_a_dead_one() {
    scenarios::drill(&ApiTier { ip_base: 151 }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifting_the_pause_ramps_replay_up_again() {
    let primary = Primary::start();
    let replay = json!({"replay": {"maxWorkers": 3, "ratePerSecond": 2, "rampUp": "12s"}});
    let d = ApiTier { ip_base: 161 }
        .deploy("pause", &primary, 1, replay, |_, _| {})
        .await;
    let admin = d.admin(0);
    // healthy for longer than rampUp: full speed
    d.wait_reason("Full").await;
    d.patch(json!({"spec": {"replay": {"paused": true}}}));
    d.wait_reason("Paused").await;
    eventually(
        "the pod holds its mail",
        Duration::from_secs(30),
        || async { (admin.workers().await == 0).then_some(()) },
    )
    .await;
    let sent = send_n(d.smtp(0), "paused", 3).await;
    assert!(primary.received_order().is_empty(), "held while paused");
    // lifted: the primary has been healthy all along, yet replay starts again from one worker
    d.patch(json!({"spec": {"replay": {"paused": false}}}));
    let st = eventually("replay resumed", Duration::from_secs(60), || async {
        let st = d.status();
        (st["replay"]["reason"] != "Paused").then_some(st)
    })
    .await;
    assert_eq!(st["replay"]["reason"], "RampingUp", "{st}");
    assert!(st["replay"]["workers"].as_u64() < Some(3), "{st}");
    assert!(st["replay"]["resumedAt"].is_string(), "{st}");
    d.wait_reason("Full").await;
    admin.wait_empty(Duration::from_secs(60)).await;
    assert_eq!(primary.received_order(), sent);
}

/// An operator and a BackupMx whose primary's port has nothing listening (the probe finds it
/// down at once, PrimaryDown is raised), with `extra` in its spec, `prepare(cluster, ns)` run
/// before it is applied; no pods are played.
async fn dead_primary(
    prefix: &str,
    extra: serde_json::Value,
    prepare: impl FnOnce(&Cluster, &str),
) -> (String, Operator) {
    let cluster = cluster();
    let ns = cluster.namespace(prefix).await;
    prepare(cluster, &ns);
    let op = Operator::start(
        cluster,
        &format!("op-{prefix}"),
        &["--namespace", &ns, "--leader-elect=false"],
    );
    let dead = backupmx_tests::free_port();
    cluster.apply(Some(&ns), &scenarios::backupmx("127.0.0.1", dead, 1, extra));
    (ns, op)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_with_a_certificate_from_an_unknown_ca_gets_nothing_and_the_cause_is_logged() {
    // the webhook's certificate comes from a CA the BackupMx's bundle does not hold
    let hook = Webhook::start_with(
        &TestCa::new("a CA the operator is not told about").issue(&["127.0.0.1", "localhost"]),
    )
    .await;
    let trusted = TestCa::new("the CA in spec.caBundle");

    // nothing listens at the primary's port: the operator's probe finds it down, PrimaryDown
    // is raised and sent to the webhook
    let (ns, op) = dead_primary(
        "alerttls",
        json!({"alerts": {"webhookUrl": hook.url},
               "caBundle": {"secretName": "alerts-ca"}}),
        |cluster, ns| cluster.apply(Some(ns), &ca_bundle_secret("alerts-ca", &trusted.pem())),
    )
    .await;
    let cluster = cluster();
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
    let events = cluster.events(&ns);
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

    // nothing listens at the primary's port: PrimaryDown is raised and mailed through the relay
    let (ns, _op) = dead_primary(
        "alertmail",
        json!({"alerts": {"email": "oncall@example.test", "smtpRelay": relay.addr()}}),
        |_, _| {},
    )
    .await;
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
async fn a_primary_answering_421_backs_the_workers_off_until_it_takes_mail_again() {
    // healthy to the probe (220, EHLO, QUIT) but `421` and a hang-up at MAIL FROM
    let busy = Sink::start(&["-Q", "mail"], 0, false).await;
    let port = busy.port;
    let replay = json!({"replay": {"maxWorkers": 4, "ratePerSecond": 5, "rampUp": "1s"}});
    let bmx = scenarios::backupmx("127.0.0.1", port, 1, replay);
    let d = ApiDeployment::start(171, "backoff", &busy.addr(), bmx, 1, |_, _| {}).await;
    eventually("the primary healthy", Duration::from_secs(60), || async {
        (d.status()["primary"]["healthy"] == true).then_some(())
    })
    .await;
    let sent = send_n(d.smtp(0), "backoff", 4).await;

    // the pod reports the 421s; the operator halves the workers and says why (during the 1 s
    // ramp half of 1 is still 1; once ramped, half of 4)
    let s = eventually(
        "replay reason Backoff with 2 of 4 workers",
        Duration::from_secs(60),
        || async {
            let s = d.status();
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
        || async { (d.admin(0).workers().await == 2).then_some(()) },
    )
    .await;
    assert_eq!(d.admin(0).queued().await, 4, "deferred, not lost");

    // the primary takes mail again on the same port: delivered in order, back to full speed
    busy.stop();
    let sink = Sink::start(&[], port, true).await;
    d.admin(0).wait_empty(Duration::from_secs(60)).await;
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
        let s = d.status();
        (s["replay"]["reason"] == "Full" && s["replay"]["workers"] == 4).then_some(())
    })
    .await;
}
