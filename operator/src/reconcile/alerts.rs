//! Alerts: every change of what needs attention becomes a Kubernetes event and, for the ones a
//! person must act on, a webhook POST and/or an email. The raised set is kept in
//! `status.alerts`, so each change is told once — one "down" and one "recovered" per outage —
//! across reconcile passes and operator restarts.
//!
//! | alert | raised when | webhook/email |
//! |---|---|---|
//! | `PrimaryDown` / `PrimaryRecovered` | the probe's verdict flips | yes |
//! | `QueueingStarted` / `ReplayFinished` | mail is queued / the queue is empty again | no (event) |
//! | `QueueAgeWarning` / `QueueAgeNormal` | the oldest message passes `spec.alerts.queueAgeWarning` | yes |
//! | `RetentionNear` / `RetentionNormal` | the oldest message has used 80% of `spec.retention` | yes |
//! | `DiskFilling` / `DiskNormal` | a pod's queue uses over 80% of its volume | yes |
//!
//! # Delivery
//! The reconcile pass only decides what is due ([`step`]): it publishes the events and pushes
//! the alerts for the webhook and the email onto a bounded queue ([`AlertQueue`],
//! [`QUEUE_CAPACITY`]) without waiting. One task ([`AlertQueue::spawn`]) delivers them in
//! order, each with its own timeout (webhook 10 s, email 15 s); what fails is logged (warn,
//! with the BackupMx, the alert, where it went and the whole cause) and published as an
//! `AlertNotDelivered` event. A full queue drops the new alert: a warning in the log, an
//! `AlertNotDelivered` event and `backupmx_alerts_dropped_total`. At shutdown the task delivers
//! what is already queued, then stops.

use std::{future::Future, sync::Arc, time::Duration};

use chrono::{SecondsFormat, Utc};
use kube::{
    ResourceExt,
    runtime::events::{EventType, Recorder},
};
use mail_builder::MessageBuilder;
use mx_pod::trust::{TlsPolicy, Trust, error_chain};
use serde_json::json;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{
    replay::ReplayOutcome,
    step::{Note, StepOutcome},
};
use crate::{
    crd::{AlertState, BackupMx, QueueStatus},
    metrics::Metrics,
    pod_admin::PodQueue,
    validate::ValidSpec,
};

/// One change to tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// PascalCase reason (event reason, webhook `event`).
    pub reason: &'static str,
    pub message: String,
    /// A problem (Warning event) rather than a recovery.
    pub warning: bool,
    /// Also sent to the webhook and the email.
    pub notify: bool,
}

/// The alert state from the pass' observations, against the thresholds of `spec`.
pub fn state(
    spec: &ValidSpec,
    healthy: Option<bool>,
    queue: &QueueStatus,
    disk_bytes: &[(String, u64)],
) -> AlertState {
    let warn_age = spec.alerts.queue_age_warning;
    let retention = spec.retention;
    let volume = spec.storage_bytes;
    let age = Duration::from_secs(queue.oldest_age_seconds);
    AlertState {
        primary_down: healthy == Some(false),
        queueing: queue.messages > 0,
        queue_old: queue.messages > 0 && age > warn_age,
        near_retention: queue.messages > 0 && age.as_secs_f64() > retention.as_secs_f64() * 0.8,
        disk_high: disk_bytes
            .iter()
            .any(|(_, b)| *b as f64 > volume as f64 * 0.8),
    }
}

/// The changes from `before` to `now`.
pub fn changes(
    bmx: &BackupMx,
    before: &AlertState,
    now: &AlertState,
    queue: &QueueStatus,
    primary_error: Option<&str>,
    disk_bytes: &[(String, u64)],
) -> Vec<Alert> {
    let domains = bmx.spec.domains.join(", ");
    let primary = &bmx.spec.primary.host;
    let mut out = Vec::new();
    let mut flip = |was: bool, is: bool, up: Alert, down: Alert| {
        if !was && is {
            out.push(up);
        } else if was && !is {
            out.push(down);
        }
    };
    flip(
        before.primary_down,
        now.primary_down,
        Alert {
            reason: "PrimaryDown",
            message: format!(
                "primary {primary} is down ({}): mail for {domains} is queued on the backup",
                primary_error.unwrap_or("no answer")
            ),
            warning: true,
            notify: true,
        },
        Alert {
            reason: "PrimaryRecovered",
            message: format!(
                "primary {primary} answers again: queued mail for {domains} is being replayed"
            ),
            warning: false,
            notify: true,
        },
    );
    flip(
        before.queueing,
        now.queueing,
        Alert {
            reason: "QueueingStarted",
            message: format!("{} message(s) queued for {domains}", queue.messages),
            warning: false,
            notify: false,
        },
        Alert {
            reason: "ReplayFinished",
            message: format!("the queue for {domains} is empty: everything was delivered"),
            warning: false,
            notify: false,
        },
    );
    flip(
        before.queue_old,
        now.queue_old,
        Alert {
            reason: "QueueAgeWarning",
            message: format!(
                "the oldest queued message is {} old ({} queued)",
                human(queue.oldest_age_seconds),
                queue.messages
            ),
            warning: true,
            notify: true,
        },
        Alert {
            reason: "QueueAgeNormal",
            message: "no queued message is older than the warning age any more".into(),
            warning: false,
            notify: true,
        },
    );
    flip(
        before.near_retention,
        now.near_retention,
        Alert {
            reason: "RetentionNear",
            message: format!(
                "the oldest queued message is {} old; at {} it is bounced to its sender",
                human(queue.oldest_age_seconds),
                bmx.spec.retention
            ),
            warning: true,
            notify: true,
        },
        Alert {
            reason: "RetentionNormal",
            message: "no queued message is near the retention limit any more".into(),
            warning: false,
            notify: true,
        },
    );
    let fullest = disk_bytes.iter().max_by_key(|(_, b)| *b);
    flip(
        before.disk_high,
        now.disk_high,
        Alert {
            reason: "DiskFilling",
            message: format!(
                "the queue of {} uses {} MiB, over 80% of its {} volume: new mail will be deferred (452) when it is full",
                fullest.map(|f| f.0.as_str()).unwrap_or("a pod"),
                fullest.map_or(0, |f| f.1 >> 20),
                bmx.spec.storage.size
            ),
            warning: true,
            notify: true,
        },
        Alert {
            reason: "DiskNormal",
            message: "every pod's queue is under 80% of its volume again".into(),
            warning: false,
            notify: true,
        },
    );
    out
}

fn human(secs: u64) -> String {
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

/// The alerts step of an apply pass: the alert state `status.alerts` is to keep, an event per
/// change since the last pass, and the changes a person must act on queued for the webhook and
/// the email (`trust` verifies the webhook). A change the queue refused (full) adds an
/// `AlertNotDelivered` event.
pub fn step(
    bmx: &BackupMx,
    valid: &ValidSpec,
    alerts: &AlertQueue,
    queues: &[PodQueue],
    replay: &ReplayOutcome,
    trust: &Trust,
) -> (AlertState, StepOutcome) {
    let queue = super::status::queue_status(queues);
    let disk: Vec<(String, u64)> = queues
        .iter()
        .filter_map(|q| {
            q.result
                .as_ref()
                .ok()
                .map(|s| (q.pod.clone(), s.disk_bytes))
        })
        .collect();
    let before = bmx
        .status
        .as_ref()
        .and_then(|s| s.alerts.clone())
        .unwrap_or_default();
    let now = state(valid, replay.healthy, &queue, &disk);
    let sent_anywhere = bmx
        .spec
        .alerts
        .as_ref()
        .is_some_and(|a| a.webhook_url.is_some() || a.email.is_some());
    let mut events = Vec::new();
    let told = changes(
        bmx,
        &before,
        &now,
        &queue,
        replay.primary.last_error.as_deref(),
        &disk,
    );
    for alert in told {
        events.push(Note::new(alert.warning, alert.reason, &alert.message));
        if alert.notify && sent_anywhere {
            let reason = alert.reason;
            if let Err(why) = alerts.push(bmx, alert, trust) {
                let message = format!("{reason}: not sent to the webhook/email: {why}");
                events.push(Note::warning("AlertNotDelivered", message));
            }
        }
    }
    (now, StepOutcome::events(events))
}

/// How many alerts may wait for delivery; a new one beyond that is dropped.
pub const QUEUE_CAPACITY: usize = 256;

/// How long delivery may go on after shutdown for what was queued before it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// An alert waiting for delivery, with what delivery needs: the object as the pass saw it
/// (`spec.alerts`, its names and domains) and the trust that verifies the webhook.
pub struct Queued {
    pub bmx: BackupMx,
    pub alert: Alert,
    pub trust: Trust,
}

/// The reconcile side of the alert queue: [`AlertQueue::push`] never waits.
#[derive(Clone)]
pub struct AlertQueue {
    tx: mpsc::Sender<Queued>,
    metrics: Arc<Metrics>,
}

impl AlertQueue {
    /// A queue of `capacity` and its receiving end (for [`deliver`]); drops are counted in
    /// `metrics`.
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> (Self, mpsc::Receiver<Queued>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx, metrics }, rx)
    }

    /// A queue of [`QUEUE_CAPACITY`] and the task that delivers it ([`notify`]), publishing
    /// `AlertNotDelivered` through `recorder` for what fails. After `shutdown` the task
    /// delivers what is queued and ends (give it [`SHUTDOWN_GRACE`]); it also ends once every
    /// clone of the queue is gone.
    pub fn spawn(
        recorder: Recorder,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (queue, rx) = Self::new(QUEUE_CAPACITY, metrics);
        let task = tokio::spawn(deliver(rx, shutdown, move |q: Queued| {
            let recorder = recorder.clone();
            async move {
                for failure in notify(&q.bmx, &q.alert, &q.trust).await {
                    let (bmx, warning) = (&q.bmx, EventType::Warning);
                    super::publish_with(&recorder, bmx, warning, "AlertNotDelivered", failure)
                        .await;
                }
            }
        }));
        (queue, task)
    }

    /// Queues `alert` about `bmx` for delivery; the error says why it was dropped instead (the
    /// queue is full, or shut down), which is logged and counted.
    pub fn push(&self, bmx: &BackupMx, alert: Alert, trust: &Trust) -> Result<(), &'static str> {
        let queued = Queued {
            bmx: bmx.clone(),
            alert,
            trust: trust.clone(),
        };
        let (why, dropped) = match self.tx.try_send(queued) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(q)) => ("the alert queue is full", q),
            Err(TrySendError::Closed(q)) => ("alert delivery has stopped", q),
        };
        let (ns, name) = (bmx.namespace().unwrap_or_default(), bmx.name_any());
        let alert = dropped.alert.reason;
        warn!(backupmx = %format!("{ns}/{name}"), alert, capacity = self.tx.max_capacity(),
            "alert not sent to the webhook/email: {why}");
        self.metrics.alert_dropped(&ns, &name, alert);
        Err(why)
    }
}

/// Takes queued alerts one at a time, in queue order, and hands each to `send` (which logs
/// and reports its own failures), until the queue is gone; after `shutdown`, only what is
/// queued already.
pub async fn deliver<F, Fut>(
    mut rx: mpsc::Receiver<Queued>,
    shutdown: CancellationToken,
    mut send: F,
) where
    F: FnMut(Queued) -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        tokio::select! {
            queued = rx.recv() => match queued {
                Some(q) => send(q).await,
                None => return,
            },
            () = shutdown.cancelled() => break,
        }
    }
    rx.close();
    while let Some(q) = rx.recv().await {
        send(q).await;
    }
}

/// Sends `alert` to the webhook and the email of `spec.alerts`; returns what failed, each
/// failure also logged (warn) with where it went and the whole cause. `trust` (the BackupMx's
/// CA bundle and the Mozilla roots) verifies the webhook's certificate.
pub async fn notify(bmx: &BackupMx, alert: &Alert, trust: &Trust) -> Vec<String> {
    let Some(a) = &bmx.spec.alerts else {
        return Vec::new();
    };
    let mut failed = Vec::new();
    let name = format!(
        "{}/{}",
        bmx.metadata.namespace.as_deref().unwrap_or_default(),
        bmx.metadata.name.as_deref().unwrap_or_default()
    );
    let when = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
    if let Some(url) = &a.webhook_url {
        let body = json!({
            "text": format!("[backupmx {name}] {}: {}", alert.reason, alert.message),
            "event": alert.reason,
            "severity": if alert.warning { "warning" } else { "info" },
            "backupmx": name,
            "domains": bmx.spec.domains,
            "message": alert.message,
            "time": when,
        });
        if let Err(error) = webhook(url, &body, trust).await {
            warn!(backupmx = %name, alert = alert.reason, url = %url, %error,
                "alert not delivered to the webhook");
            failed.push(format!("webhook {url}: {error}"));
        }
    }
    if let Some(to) = &a.email {
        let Some(relay) = &a.smtp_relay else {
            warn!(backupmx = %name, alert = alert.reason, to = %to,
                "alert email not sent: spec.alerts.smtpRelay is not set");
            failed.push("email: spec.alerts.smtpRelay is not set".into());
            return failed;
        };
        if let Err(error) = email(bmx, relay, to, &name, alert, &when, trust).await {
            warn!(backupmx = %name, alert = alert.reason, to = %to, relay = %relay, %error,
                "alert email not delivered");
            failed.push(format!("email to {to} via {relay}: {error}"));
        }
    }
    failed
}

/// POSTs `body` to `url`; the error is the whole cause (a refused certificate says why, e.g.
/// "invalid peer certificate: UnknownIssuer"), without the URL, which the caller names.
async fn webhook(url: &str, body: &serde_json::Value, trust: &Trust) -> Result<(), String> {
    let http = trust
        .https()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("HTTP client: {}", error_chain(&e)))?;
    match http.post(url).json(body).send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("HTTP {}", r.status())),
        Err(e) => Err(error_chain(&e.without_url())),
    }
}

/// Sends the alert by email through `relay`, with STARTTLS whenever the relay offers it (TLS
/// policy `may`: the relay's certificate is not checked, as between MTAs).
async fn email(
    bmx: &BackupMx,
    relay: &str,
    to: &str,
    name: &str,
    alert: &Alert,
    when: &str,
    trust: &Trust,
) -> Result<(), String> {
    use mx_pod::outbound::{AtOnce, Rcpt, RcptResult, SmtpClient, Transaction};
    let from = format!("backupmx@{}", bmx.spec.mx.hostname);
    let body = MessageBuilder::new()
        .from(("backupmx", from.as_str()))
        .to(to)
        .subject(format!("[backupmx {name}] {}", alert.reason))
        .header(
            "Auto-Submitted",
            mail_builder::headers::raw::Raw::new("auto-generated"),
        )
        .text_body(format!(
            "{}\n\nBackupMx: {name}\nDomains: {}\nTime: {when}\n",
            alert.message,
            bmx.spec.domains.join(", ")
        ))
        .write_to_vec()
        .map_err(|e| e.to_string())?;
    let tx = Transaction {
        sender: &from,
        ..Transaction::default()
    };
    let mut c = SmtpClient::open(
        relay,
        &bmx.spec.mx.hostname,
        Duration::from_secs(15),
        TlsPolicy::May,
        trust,
    )
    .await
    .map_err(|e| e.to_string())?;
    let result = c
        .send(&tx, &[(0, Rcpt::plain(to))], &body, &AtOnce)
        .await
        .map_err(|e| e.to_string());
    c.quit().await;
    let result = result?;
    match result.results.first() {
        Some((_, RcptResult::Delivered(_))) => Ok(()),
        Some((_, other)) => Err(format!("{other:?}")),
        None => Err("no answer for the recipient".into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::{Json, Router, http::StatusCode, routing::post};
    use http::Method;

    use super::*;
    use crate::{
        fixtures::{BackupMxExt, Expect, backupmx},
        pod_admin::PodAdmin,
        reconcile::Context,
        replay_control::{Decision, ReplayReason},
    };

    fn alert(reason: &'static str) -> Alert {
        Alert {
            reason,
            message: format!("{reason} happened"),
            warning: true,
            notify: true,
        }
    }

    /// A queue of `capacity` (nothing takes from it yet), with `reasons` pushed in order:
    /// whether each was taken.
    fn queue_with(
        capacity: usize,
        reasons: &[&'static str],
    ) -> (AlertQueue, mpsc::Receiver<Queued>, Arc<Metrics>, Vec<bool>) {
        let metrics = Arc::new(Metrics::default());
        let (queue, rx) = AlertQueue::new(capacity, metrics.clone());
        let (bmx, trust) = (backupmx(), Trust::default());
        let taken = reasons
            .iter()
            .map(|r| queue.push(&bmx, alert(r), &trust).is_ok())
            .collect();
        (queue, rx, metrics, taken)
    }

    /// Runs [`deliver`] to its end with a `send` that only records each alert's reason.
    async fn delivered(
        rx: mpsc::Receiver<Queued>,
        shutdown: CancellationToken,
    ) -> Vec<&'static str> {
        let mut sent = Vec::new();
        deliver(rx, shutdown, |q: Queued| {
            sent.push(q.alert.reason);
            std::future::ready(())
        })
        .await;
        sent
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_new_alert_and_counts_it_without_waiting() {
        // nothing takes from the queue: a push that waited for room would hang here
        let (queue, rx, metrics, taken) =
            queue_with(2, &["PrimaryDown", "QueueAgeWarning", "DiskFilling"]);
        assert_eq!(taken, [true, true, false]);
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"backupmx_alerts_dropped_total{namespace="mail",name="example",alert="DiskFilling"} 1"#
            ),
            "{text}"
        );
        // what was queued is delivered, in order; the dropped one is not
        drop(queue);
        let sent = delivered(rx, CancellationToken::new()).await;
        assert_eq!(sent, ["PrimaryDown", "QueueAgeWarning"]);
    }

    #[tokio::test]
    async fn after_shutdown_what_is_queued_is_delivered_and_nothing_more_is_taken() {
        let (queue, rx, metrics, taken) = queue_with(4, &["PrimaryDown", "PrimaryRecovered"]);
        assert_eq!(taken, [true, true]);
        let stop = CancellationToken::new();
        stop.cancel();
        // ends although the queue (a sender) is still there
        let sent = delivered(rx, stop).await;
        assert_eq!(sent, ["PrimaryDown", "PrimaryRecovered"]);
        let late = queue.push(&backupmx(), alert("DiskFilling"), &Trust::default());
        assert_eq!(late, Err("alert delivery has stopped"));
        assert!(metrics.encode().contains(r#"alert="DiskFilling"} 1"#));
    }

    /// A webhook that records each alert's `event` and refuses `QueueAgeWarning` (HTTP 500).
    async fn webhook_server(seen: Arc<Mutex<Vec<String>>>) -> String {
        let app = Router::new().route(
            "/hook",
            post(move |Json(body): Json<serde_json::Value>| async move {
                let event = body["event"].as_str().unwrap_or_default().to_string();
                let refused = event == "QueueAgeWarning";
                seen.lock().unwrap().push(event);
                if refused {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    }

    #[tokio::test]
    async fn the_delivery_task_sends_in_order_and_reports_a_failure_as_an_event() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let url = webhook_server(seen.clone()).await;
        let bmx = backupmx().with_spec(|s| {
            s.alerts = Some(serde_json::from_value(json!({"webhookUrl": url})).unwrap())
        });
        let (ctx, server) = Context::test(PodAdmin::default());
        let events = "/apis/events.k8s.io/v1/namespaces/mail/events";
        let verifier = server.run(vec![Expect::new(Method::POST, events, |b| {
            (StatusCode::CREATED, b.clone())
        })]);
        let trust = Trust::default();
        for reason in ["PrimaryDown", "PrimaryRecovered", "QueueAgeWarning"] {
            ctx.alerts.push(&bmx, alert(reason), &trust).unwrap();
        }
        // the task delivers what is queued, then ends with the context
        drop(ctx);
        let calls = verifier.await.expect("the failure is published");
        let event = &calls[0].1;
        assert_eq!(event["reason"], "AlertNotDelivered");
        assert_eq!(event["type"], "Warning");
        let note = event["note"].as_str().unwrap();
        assert!(note.contains(&url) && note.contains("HTTP 500"), "{note}");
        // the failure is published after its call, the last one: every call was made, in order
        let sent = seen.lock().unwrap().clone();
        assert_eq!(sent, ["PrimaryDown", "PrimaryRecovered", "QueueAgeWarning"]);
    }

    fn replay_down() -> ReplayOutcome {
        ReplayOutcome {
            decision: Decision {
                workers: 0,
                reason: ReplayReason::PrimaryDown,
                message: String::new(),
            },
            primary: Default::default(),
            maintenance: Default::default(),
            draining: Vec::new(),
            drained: false,
            push_errors: Vec::new(),
            requeue: None,
            healthy: Some(false),
            tls_failed: false,
            resumed_at: None,
        }
    }

    #[tokio::test]
    async fn the_step_tells_each_change_and_queues_only_what_goes_somewhere() {
        let metrics = Arc::new(Metrics::default());
        let (queue, mut rx) = AlertQueue::new(1, metrics);
        let trust = Trust::default();

        // no webhook, no email: events only, nothing queued
        let bmx = backupmx().finalized();
        let valid = crate::validate::validate(&bmx.spec).unwrap();
        let (state, outcome) = step(&bmx, &valid, &queue, &[], &replay_down(), &trust);
        assert!(state.primary_down);
        let told: Vec<_> = outcome.events.iter().map(|n| n.reason.as_str()).collect();
        assert_eq!(told, ["PrimaryDown"]);
        assert_eq!(outcome.requeue, None);
        assert!(rx.try_recv().is_err(), "nothing queued");

        // with a webhook: queued; with the queue full, an AlertNotDelivered event
        let bmx = bmx.with_spec(|s| {
            s.alerts =
                Some(serde_json::from_value(json!({"webhookUrl": "https://hook.test/"})).unwrap())
        });
        let (_, outcome) = step(&bmx, &valid, &queue, &[], &replay_down(), &trust);
        assert_eq!(outcome.events.len(), 1, "{:?}", outcome.events);
        let (_, outcome) = step(&bmx, &valid, &queue, &[], &replay_down(), &trust);
        let told: Vec<_> = outcome.events.iter().map(|n| n.reason.as_str()).collect();
        assert_eq!(told, ["PrimaryDown", "AlertNotDelivered"]);
        let dropped = &outcome.events[1].message;
        assert_eq!(
            dropped,
            "PrimaryDown: not sent to the webhook/email: the alert queue is full"
        );
        assert_eq!(rx.try_recv().unwrap().alert.reason, "PrimaryDown");

        // told once: the next pass starts from the state this one keeps
        let mut told_bmx = bmx.clone();
        told_bmx.status = Some(crate::crd::BackupMxStatus {
            alerts: Some(state),
            ..Default::default()
        });
        let (_, outcome) = step(&told_bmx, &valid, &queue, &[], &replay_down(), &trust);
        assert!(outcome.events.is_empty(), "{:?}", outcome.events);
    }

    #[test]
    fn each_change_is_told_once() {
        let bmx = backupmx();
        let valid = crate::validate::validate(&bmx.spec).unwrap();
        let q = QueueStatus {
            messages: 3,
            oldest_age_seconds: 7200,
            ..Default::default()
        };
        let before = AlertState::default();
        let now = state(&valid, Some(false), &q, &[("example-0".into(), 900 << 20)]);
        assert!(now.primary_down && now.queueing && now.queue_old && now.disk_high);
        assert!(!now.near_retention);
        let c = changes(&bmx, &before, &now, &q, Some("connection refused"), &[]);
        let reasons: Vec<_> = c.iter().map(|a| a.reason).collect();
        assert_eq!(
            reasons,
            [
                "PrimaryDown",
                "QueueingStarted",
                "QueueAgeWarning",
                "DiskFilling"
            ]
        );
        assert!(c[0].message.contains("connection refused"));
        assert!(
            changes(&bmx, &now, &now, &q, None, &[]).is_empty(),
            "no change, nothing told"
        );
        let empty = QueueStatus::default();
        let after = state(&valid, Some(true), &empty, &[]);
        let reasons: Vec<_> = changes(&bmx, &now, &after, &empty, None, &[])
            .iter()
            .map(|a| a.reason)
            .collect();
        assert_eq!(
            reasons,
            [
                "PrimaryRecovered",
                "ReplayFinished",
                "QueueAgeNormal",
                "DiskNormal"
            ]
        );
    }
}
