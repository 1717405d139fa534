//! The replay scenarios both Kubernetes tiers run, written once: an outage and the ramp after
//! it, a maintenance window that opens on its cron schedule, a cutover, a scale-down drain,
//! alerts and the failover drill.
//!
//! A tier says how pods run through [`Tier`] and [`Deployment`]:
//! - the API-server tier ([`crate::kube::ApiTier`], `tests/operator/replay.rs`): the real API
//!   server and controller manager, each pod a real mx-pod process on its own 127.0.0.x
//!   address, the test playing the kubelet;
//! - the node tier ([`crate::node::NodeTier`], `tests/node/main.rs`): a real kubelet runs the
//!   mx-pod image on PersistentVolumes.
//!
//! What only one tier can do (kube-proxy, tmpfs volumes, the leader killed) stays in its own
//! test files.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    Admin, Primary, Sink,
    kube::{Cluster, Operator, condition, eventually, operator_bin, text},
    message,
    realparts::{Smtp, dot_stuffed},
    send_n, seq_of,
    webhook::Webhook,
    with_tag,
};

/// How long a pod may take to be replaced or removed (the kubelet 1.20 takes ~10 s to delete
/// a pod, sometimes a minute).
pub const POD_TIMEOUT: Duration = Duration::from_secs(150);

/// A real Postfix primary the tier's pods (and the operator's probe) can reach.
pub trait TierPrimary {
    /// Starts it again (an outage ends); the maildir is kept.
    fn up(&mut self);
    /// Stops it (an outage): connections are refused.
    fn down(&mut self);
    /// `spec.primary.host` as the pods reach it.
    fn host(&self) -> String;
    fn port(&self) -> u16;
    /// The Postfix behind it: what it received.
    fn postfix(&self) -> &Primary;
    /// `host:port`, as `status.primary.target` shows it.
    fn target(&self) -> String {
        format!("{}:{}", self.host(), self.port())
    }
}

impl TierPrimary for Primary {
    fn up(&mut self) {
        Primary::up(self)
    }
    fn down(&mut self) {
        Primary::down(self)
    }
    fn host(&self) -> String {
        "127.0.0.1".into()
    }
    fn port(&self) -> u16 {
        self.port
    }
    fn postfix(&self) -> &Primary {
        self
    }
}

/// Where a pod is in its replacement by the StatefulSet's rolling update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// The old pod runs.
    Running,
    /// The old pod is being deleted: its mx-pod shuts down (transactions in flight finish).
    Terminating,
    /// The new pod runs, on the same volume.
    Replaced,
}

/// A tier: where BackupMx pods run.
#[allow(async_fn_in_trait)]
pub trait Tier {
    type Primary: TierPrimary;
    type Deployment: Deployment;

    /// A primary for example.test that the pods reach.
    fn start_primary(&self) -> Self::Primary;

    /// A namespace, an operator watching it, the BackupMx `example` ([`backupmx`] + `extra`)
    /// and its `replicas` pods running; `prepare(cluster, namespace)` runs before the BackupMx
    /// is applied (e.g. to create a Secret it names).
    async fn deploy(
        &self,
        prefix: &str,
        primary: &Self::Primary,
        replicas: usize,
        extra: Value,
        prepare: impl FnOnce(&Cluster, &str),
    ) -> Self::Deployment;
}

/// One BackupMx `example`, its operator and its pods in a namespace of a tier.
#[allow(async_fn_in_trait)]
pub trait Deployment {
    fn cluster(&self) -> &Cluster;
    fn ns(&self) -> &str;
    fn operator(&self) -> &Operator;
    /// Pod `i`'s SMTP address.
    fn smtp(&self, i: usize) -> SocketAddr;
    /// Pod `i`'s admin API, with the BackupMx's token.
    fn admin(&self, i: usize) -> Admin;
    /// Pod `i`'s mx-pod dies (SIGKILL) and is started again on the same volume, as the kubelet
    /// restarts a crashed container; returns once it answers.
    async fn crash(&mut self, i: usize);
    /// One look at (API tier: one step of playing the kubelet in) pod `i`'s replacement by a
    /// rolling update; the new pod's mx-pod sends to `primary` (`host:port`).
    async fn roll(&mut self, i: usize, primary: &str) -> Rollout;
    /// Waits until a scale-down has removed pod `i` (its mx-pod stopped, the pod gone).
    async fn removed(&mut self, i: usize);

    /// `kubectl get WHAT` in the namespace, as JSON.
    fn get(&self, what: &str) -> Option<Value> {
        self.cluster().get(self.ns(), what)
    }
    fn bmx(&self) -> Option<Value> {
        self.get("bmx/example")
    }
    /// The BackupMx's status (null while there is none).
    fn status(&self) -> Value {
        self.bmx()
            .map(|b| b["status"].clone())
            .unwrap_or(Value::Null)
    }
    /// A merge patch of the BackupMx.
    fn patch(&self, patch: Value) {
        self.cluster().patch(self.ns(), "bmx/example", &patch)
    }
    /// Sets an annotation of the BackupMx (`key=value`).
    fn annotate(&self, key_value: &str) {
        self.cluster().kubectl_ok(&[
            "-n",
            self.ns(),
            "annotate",
            "bmx/example",
            key_value,
            "--overwrite",
        ]);
    }
    fn events(&self) -> String {
        self.cluster().events(self.ns())
    }
    /// Waits until `status.replay.reason` is `reason`.
    async fn wait_reason(&self, reason: &str) {
        eventually(
            &format!("status.replay.reason {reason}"),
            Duration::from_secs(60),
            || async { (self.status()["replay"]["reason"] == reason).then_some(()) },
        )
        .await;
    }
}

/// A BackupMx `example` for example.test whose primary is `host:port`, probed every second,
/// with a small, quick replay ramp; `extra` is merged into its spec.
pub fn backupmx(host: &str, port: u16, replicas: usize, extra: Value) -> Value {
    let mut spec = json!({
        "domains": ["example.test"], "replicas": replicas, "deletionPolicy": "Orphan",
        "primary": {"host": host, "port": port,
                    "healthCheck": {"interval": "1s", "timeout": "1s", "failureThreshold": 2, "successThreshold": 2}},
        "storage": {"size": "1Gi"},
        "mx": {"hostname": "mx2.example.test"},
        "replay": {"maxWorkers": 3, "ratePerSecond": 2, "rampUp": "6s"},
    });
    merge(&mut spec, extra);
    json!({"apiVersion": "backupmx.io/v1alpha1", "kind": "BackupMx",
           "metadata": {"name": "example"}, "spec": spec})
}

/// Merges `patch`'s keys into `into`, objects recursively.
pub fn merge(into: &mut Value, patch: Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (a, b) => *a = b,
    }
}

/// Prints how long a scenario took (the tiers' logs show where time goes).
fn done(ns: &str, what: &str, started: Instant) {
    println!("[{ns}] {what}: passed in {:.1?}", started.elapsed());
}

/// An outage: the operator pushes 0 workers, mail queues on the pod's volume and survives the
/// pod's mx-pod being killed, the primary comes back, replay ramps up from one worker to
/// three and the queue empties in arrival order.
pub async fn outage<T: Tier>(tier: &T) {
    let started = Instant::now();
    let mut primary = tier.start_primary();
    primary.down();
    let mut d = tier
        .deploy("outage", &primary, 1, json!({}), |_, _| {})
        .await;
    eventually("PrimaryHealthy=False", Duration::from_secs(60), || async {
        (condition(&d.bmx()?, "PrimaryHealthy")?.1 == "PrimaryDown").then_some(())
    })
    .await;
    let st = d.status();
    assert_eq!(
        (
            st["replay"]["workers"].as_u64(),
            st["replay"]["reason"].as_str()
        ),
        (Some(0), Some("PrimaryDown"))
    );
    assert_eq!(st["primary"]["healthy"], false);
    assert!(st["primary"]["lastError"].as_str().is_some(), "{st}");
    let sent = send_n(d.smtp(0), "outage", 8).await;
    assert_eq!(
        d.admin(0).workers().await,
        0,
        "held while the primary is down"
    );

    // the mx-pod is killed (SIGKILL): it comes back on the same volume with every
    // acknowledged message
    d.crash(0).await;
    assert_eq!(d.admin(0).queued().await, 8, "the queue survived kill -9");
    eventually("the queue in status", Duration::from_secs(90), || async {
        (d.status()["queue"]["messages"] == 8).then_some(())
    })
    .await;

    // recovery: healthy after 2 good probes, then 1 worker growing to 3 over 6 s
    primary.up();
    let mut seen: Vec<(u64, String)> = Vec::new();
    eventually("replay at full speed", Duration::from_secs(90), || {
        let st = d.status();
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
    let admin = d.admin(0);
    eventually("3 workers in the pod", Duration::from_secs(60), || async {
        (admin.workers().await == 3).then_some(())
    })
    .await;
    admin.wait_empty(Duration::from_secs(90)).await;
    assert_eq!(
        primary.postfix().received_order(),
        sent,
        "delivered once each, in arrival order"
    );
    let b = d.bmx().unwrap();
    assert_eq!(condition(&b, "Replaying").unwrap().0, "True");
    assert_eq!(condition(&b, "PrimaryHealthy").unwrap().0, "True");
    done(d.ns(), "outage", started);
}

/// The next minute's `(minute, hour)` in Tokyo's time (UTC+9, no DST) that is at least 15 s
/// away, and that instant.
fn next_minute_in_tokyo() -> (String, chrono::DateTime<chrono::Utc>) {
    use chrono::{Duration as D, Timelike, Utc};
    let soon = Utc::now() + D::seconds(15);
    let at = (soon + D::minutes(1))
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap();
    let tokyo = at + D::hours(9);
    (format!("{} {}", tokyo.minute(), tokyo.hour()), at)
}

/// A maintenance window on a cron schedule (in a named time zone) opens while the primary is
/// up and holds replay; when it closes, the queue is delivered in order. The next window, a
/// one-off, is reported.
pub async fn maintenance_window<T: Tier>(tier: &T) {
    let started = Instant::now();
    let primary = tier.start_primary();
    let d = tier
        .deploy("window", &primary, 1, json!({}), |_, _| {})
        .await;
    let admin = d.admin(0);
    eventually("the primary healthy", Duration::from_secs(60), || async {
        (d.status()["primary"]["healthy"] == true).then_some(())
    })
    .await;
    // a daily window at the coming minute in Tokyo's time, 40 s long; a one-off 12 hours away
    let (minute_hour, opens) = next_minute_in_tokyo();
    let later = chrono::Utc::now() + chrono::Duration::hours(12);
    d.patch(json!({"spec": {"maintenanceWindows": [
        {"schedule": format!("{minute_hour} * * *"), "timeZone": "Asia/Tokyo", "duration": "40s", "reason": "nightly backup"},
        {"start": later.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "duration": "1h", "reason": "primary upgrade"}
    ]}}));
    let st = eventually(
        "the coming window in status",
        Duration::from_secs(30),
        || async {
            let st = d.status();
            (st["maintenance"]["nextReason"] == "nightly backup").then_some(st)
        },
    )
    .await;
    assert_eq!(st["maintenance"]["active"], false, "not open yet: {st}");
    assert_ne!(st["replay"]["reason"], "MaintenanceWindow", "{st}");

    // it opens on its schedule: replay is held though the primary is healthy
    let st = eventually(
        "the cron window to open",
        Duration::from_secs(120),
        || async {
            let st = d.status();
            (st["replay"]["reason"] == "MaintenanceWindow" && st["primary"]["healthy"] == true)
                .then_some(st)
        },
    )
    .await;
    assert!(
        chrono::Utc::now() >= opens,
        "opened at {opens}, not before: {st}"
    );
    assert_eq!(st["maintenance"]["active"], true);
    assert_eq!(st["maintenance"]["reason"], "nightly backup");
    assert_eq!(st["maintenance"]["nextReason"], "primary upgrade", "{st}");
    eventually("0 workers in the pod", Duration::from_secs(30), || async {
        (admin.workers().await == 0).then_some(())
    })
    .await;
    let sent = send_n(d.smtp(0), "window", 3).await;
    let st = d.status();
    assert_eq!(
        st["maintenance"]["active"], true,
        "the window is still open: {st}"
    );
    assert_eq!(admin.workers().await, 0);
    assert_eq!(admin.queued().await, 3);
    assert!(primary.postfix().received_order().is_empty());
    // it closes: replay ramps up from one worker (the primary was just worked on), delivers
    eventually(
        "the window to close and replay to ramp up",
        Duration::from_secs(90),
        || async {
            let st = d.status();
            (st["maintenance"]["active"] == false && st["replay"]["reason"] == "RampingUp")
                .then_some(())
        },
    )
    .await;
    admin.wait_empty(Duration::from_secs(90)).await;
    assert_eq!(primary.postfix().received_order(), sent);
    done(d.ns(), "maintenance window", started);
}

/// A transaction left open in the middle of DATA: the first part of the body is sent.
struct HeldMessage {
    smtp: Smtp,
    rest: Vec<u8>,
}

impl HeldMessage {
    async fn open(to: SocketAddr, tag: &str, seq: usize) -> HeldMessage {
        let mut smtp = Smtp::connect(to).await;
        smtp.expect("EHLO client.test", "250").await;
        smtp.expect("MAIL FROM:<sender@sender.test>", "250").await;
        smtp.expect("RCPT TO:<user@example.test>", "250").await;
        smtp.expect("DATA", "354").await;
        let body = dot_stuffed(&message(tag, seq, 300));
        let (first, rest) = body.split_at(body.len() / 2);
        smtp.write(first).await;
        HeldMessage {
            smtp,
            rest: rest.to_vec(),
        }
    }

    /// Sends the rest and the final dot; the reply.
    async fn finish(mut self) -> String {
        self.smtp.write(&self.rest).await;
        self.smtp.reply().await
    }
}

/// Cutover: `spec.primary` changes; the StatefulSet rolls (the pod is replaced, the volume
/// stays). While the pod of the old configuration runs, it has no workers (asked at least
/// once), nothing reaches the old primary, and a message in the middle of DATA when the pod
/// is deleted is still acknowledged by it; every queued message goes to the new primary in
/// order.
pub async fn cutover<T: Tier>(tier: &T) {
    let started = Instant::now();
    let mut old = tier.start_primary();
    let new = tier.start_primary();
    old.down();
    let mut d = tier.deploy("cutover", &old, 1, json!({}), |_, _| {}).await;
    let mut sent = send_n(d.smtp(0), "cutover", 4).await;
    d.wait_reason("PrimaryDown").await;
    let mut held = Some(HeldMessage::open(d.smtp(0), "cutover", 4).await);

    // the migration: the spec names the new primary; the old one comes back meanwhile
    d.patch(json!({"spec": {"primary": {"host": new.host(), "port": new.port()}}}));
    eventually(
        "the new target in status",
        Duration::from_secs(60),
        || async { (d.status()["primary"]["target"] == new.target()).then_some(()) },
    )
    .await;
    old.up();
    // while the pod of the old configuration runs, it has no workers, whatever the probe says;
    // the held transaction keeps it running until it has been asked
    let old_admin = d.admin(0);
    let mut checks = 0;
    let deadline = Instant::now() + POD_TIMEOUT;
    loop {
        let state = d.roll(0, &new.target()).await;
        if state == Rollout::Replaced {
            break;
        }
        if let Some((200, r)) = old_admin.try_get("/v1/replay").await {
            assert_eq!(
                r["workers"], 0,
                "a pod with the old primary gets no workers"
            );
            checks += 1;
        }
        if state == Rollout::Terminating
            && checks > 0
            && let Some(h) = held.take()
        {
            let reply = h.finish().await;
            assert!(
                reply.starts_with("250"),
                "the transaction in flight finishes during the shutdown: {reply}"
            );
            sent.push("cutover.4@test".into());
        }
        assert!(
            Instant::now() < deadline,
            "the pod was not replaced within {POD_TIMEOUT:?} ({state:?}, {checks} checks)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("old pod asked {checks} time(s) while it ran: 0 workers each time");
    assert!(checks > 0, "the old pod's workers were never checked");
    assert!(held.is_none(), "the pod went before the held message ended");
    assert!(
        old.postfix().received_order().is_empty(),
        "nothing reaches the old primary"
    );

    d.admin(0).wait_empty(Duration::from_secs(120)).await;
    assert_eq!(
        new.postfix().received_order(),
        sent,
        "every queued message at the new primary, in order"
    );
    assert!(
        old.postfix().received_order().is_empty(),
        "and none at the old one"
    );
    done(d.ns(), "cutover", started);
}

/// Scale 3 -> 2 with mail on pod 2 (and pod 0) while the primary is down: pod 2 drains into
/// pod 0 before the StatefulSet shrinks; its claim stays; when the primary returns, every
/// message arrives exactly once, each pod's mail in its arrival order.
pub async fn scale_down<T: Tier>(tier: &T) {
    let started = Instant::now();
    let mut primary = tier.start_primary();
    primary.down();
    let mut d = tier
        .deploy("scale", &primary, 3, json!({}), |_, _| {})
        .await;
    let on_2 = send_n(d.smtp(2), "pod2", 4).await;
    let on_0 = send_n(d.smtp(0), "pod0", 2).await;
    assert_eq!(d.admin(2).queued().await, 4);
    d.wait_reason("PrimaryDown").await;

    d.patch(json!({"spec": {"replicas": 2}}));
    // pod 2 drains into pod 0 (the primary is down), then the StatefulSet shrinks
    let b = eventually("Draining=True", Duration::from_secs(60), || async {
        let b = d.bmx()?;
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
        || async { (d.get("statefulset/example")?["spec"]["replicas"] == 2).then_some(()) },
    )
    .await;
    assert_eq!(d.admin(0).queued().await, 6, "pod 2's mail is on pod 0 now");
    assert!(d.events().contains("ScaledDown"));
    d.removed(2).await;
    assert!(
        d.get("persistentvolumeclaim/queue-example-2").is_some(),
        "pod 2's claim is kept"
    );
    // the primary comes back: everything arrives exactly once
    primary.up();
    d.admin(0).wait_empty(Duration::from_secs(120)).await;
    let got = primary.postfix().received_order();
    let mut sorted = got.clone();
    sorted.sort();
    let mut want: Vec<String> = on_2.iter().chain(&on_0).cloned().collect();
    want.sort();
    assert_eq!(sorted, want, "zero loss, no duplicates");
    assert_eq!(with_tag(&got, "pod2"), on_2, "pod 2's mail in its order");
    assert_eq!(with_tag(&got, "pod0"), on_0, "pod 0's mail in its order");
    done(d.ns(), "scale-down", started);
}

/// Alerts: one PrimaryDown and one PrimaryRecovered reach a webhook (over HTTPS, its CA in
/// `spec.caBundle`) and the on-call address through the relay, however many passes run.
pub async fn alerts<T: Tier>(tier: &T) {
    let started = Instant::now();
    let hook = Webhook::start().await;
    let relay = Sink::start(&[], 0, true).await;
    let mut primary = tier.start_primary();
    let extra = json!({"alerts": {"webhookUrl": hook.url,
                                  "email": "oncall@ops.test", "smtpRelay": relay.addr()},
                       "caBundle": {"secretName": "alerts-ca"}});
    let d = tier
        .deploy("alerts", &primary, 1, extra, |cluster, ns| {
            cluster.apply(Some(ns), &hook.ca_secret("alerts-ca"))
        })
        .await;
    eventually("the primary healthy", Duration::from_secs(60), || async {
        (d.status()["primary"]["healthy"] == true).then_some(())
    })
    .await;
    primary.down();
    hook.wait_for("PrimaryDown").await;
    primary.up();
    hook.wait_for("PrimaryRecovered").await;
    // a few more passes (an annotation triggers each) change nothing
    for poke in 0..3 {
        let passes = d.operator().reconciles(d.ns(), "example").await;
        d.annotate(&format!("test/poke={poke}"));
        eventually("another pass", Duration::from_secs(60), || async {
            (d.operator().reconciles(d.ns(), "example").await > passes).then_some(())
        })
        .await;
    }
    let object = format!("{}/example", d.ns());
    hook.assert_one_down_and_one_up(&object);
    relay
        .expect_alert_mails(
            &object,
            "oncall@ops.test",
            &["PrimaryDown", "PrimaryRecovered"],
        )
        .await;
    let events = d.events();
    assert!(
        events.contains("PrimaryDown") && events.contains("PrimaryRecovered"),
        "{events}"
    );
    done(d.ns(), "alerts", started);
}

/// The failover drill: a held test message queued in a pod, released, followed to the
/// primary: passes with a healthy primary (run from the command line), fails (replay held)
/// with a dead one (asked for with the annotation).
pub async fn drill<T: Tier>(tier: &T) {
    let started = Instant::now();
    let mut primary = tier.start_primary();
    let d = tier
        .deploy("drill", &primary, 1, json!({}), |_, _| {})
        .await;
    eventually("replay running", Duration::from_secs(60), || async {
        (d.status()["replay"]["workers"].as_u64().unwrap_or(0) > 0).then_some(())
    })
    .await;

    // the command line: annotates, waits, prints, exit status
    let out = std::process::Command::new(operator_bin())
        .args(["drill", "example", "-n", d.ns(), "--timeout", "90s"])
        .env("KUBECONFIG", d.cluster().kubeconfig())
        .output()
        .unwrap();
    let out_text = text(&out);
    assert!(out.status.success(), "{out_text}");
    assert!(
        out_text.contains("Passed") && out_text.contains("accepted by the primary"),
        "{out_text}"
    );
    let drills: Vec<Vec<u8>> = primary
        .postfix()
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
    d.wait_reason("PrimaryDown").await;
    d.annotate("backupmx.io/drill=second");
    let verdict = eventually("the drill's verdict", Duration::from_secs(90), || async {
        let v = d.status()["drill"].clone();
        (v["request"] == "second" && v["result"] != "Running").then_some(v)
    })
    .await;
    assert_eq!(verdict["result"], "Failed", "{verdict}");
    assert!(
        verdict["message"]
            .as_str()
            .unwrap()
            .contains("replay is held"),
        "{verdict}"
    );
    let events = d.events();
    assert!(
        events.contains("DrillPassed") && events.contains("DrillFailed"),
        "{events}"
    );
    done(d.ns(), "drill", started);
}
