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

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use mail_builder::MessageBuilder;
use mx_pod::trust::{TlsPolicy, Trust, error_chain};
use serde_json::json;
use tracing::warn;

use super::{
    replay::ReplayOutcome,
    step::{Note, StepOutcome},
};
use crate::{
    crd::{AlertState, BackupMx, QueueStatus},
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
/// change since the last pass, and the changes a person must act on sent to the webhook and
/// the email (`trust` verifies the webhook); each failure adds an `AlertNotDelivered` event.
pub async fn step(
    bmx: &BackupMx,
    valid: &ValidSpec,
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
        if alert.notify {
            for failure in notify(bmx, &alert, trust).await {
                events.push(Note::warning("AlertNotDelivered", failure));
            }
        }
    }
    (now, StepOutcome::events(events))
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
    use super::*;
    use crate::fixtures::backupmx;

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
