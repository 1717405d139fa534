//! The failover drill: does mail queued on the backup really reach the primary? Run it with
//! `kubectl annotate bmx NAME backupmx.io/drill=now` (any new value runs it again) or
//! `backupmx-operator drill NAME`. It does not touch the primary's own configuration:
//!
//! 1. a pod queues a test message from `<>` to `postmaster@DOMAIN`, held (`POST /v1/drill`);
//! 2. the operator checks it is queued, then releases it;
//! 3. replay delivers it like any other message; when replay is held (primary down, a
//!    maintenance window, a pause) the drill fails at once, saying why;
//! 4. the result — the primary's reply, or why not within [`TIMEOUT`] — goes to `status.drill`
//!    and an event. A message not delivered in time is deleted (it would reach the postmaster
//!    late otherwise).

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use serde_json::Value;

use super::{
    Context,
    apply::{Objects, Pods},
    step::{Note, StepOutcome},
};
use crate::{
    crd::{BackupMx, DrillResult, DrillStatus},
    pod_admin::pod_ip,
};

/// The annotation that requests a drill.
pub const ANNOTATION: &str = "backupmx.io/drill";
/// How long the test message may take to reach the primary.
pub const TIMEOUT: Duration = Duration::from_secs(60);

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The drill step of an apply pass: the drill's new status (`None`: nothing to do, the
/// previous one stands), an event when it has a verdict, and a look again every 2 s while it
/// runs.
pub async fn step(
    bmx: &BackupMx,
    ctx: &Context,
    objects: &Objects,
    pods: &Pods,
    replay: &crate::replay_control::Decision,
) -> (Option<DrillStatus>, StepOutcome) {
    let drill = advance(bmx, ctx, &pods.pods, Some(&objects.token), replay).await;
    let mut outcome = StepOutcome::default();
    if let Some(d) = &drill {
        let was = bmx.status.as_ref().and_then(|s| s.drill.as_ref());
        let changed = was.is_none_or(|w| w.request != d.request || w.result != d.result);
        if changed && d.result != DrillResult::Running {
            let failed = d.result != DrillResult::Passed;
            let verdict = Note::new(failed, format!("Drill{}", d.result), &d.message);
            outcome.events.push(verdict);
        }
        if d.result == DrillResult::Running {
            outcome.requeue = Some(Duration::from_secs(2));
        }
    }
    (drill, outcome)
}

/// Advances the drill; `None` when there is nothing to do (no request, or it is answered).
async fn advance(
    bmx: &BackupMx,
    ctx: &Context,
    pods: &[Pod],
    token: Option<&str>,
    replay: &crate::replay_control::Decision,
) -> Option<DrillStatus> {
    let replay_reason = replay.reason;
    let request = bmx.annotations().get(ANNOTATION)?.clone();
    let previous = bmx.status.as_ref().and_then(|s| s.drill.clone());
    let fail = |message: String, base: Option<&DrillStatus>| DrillStatus {
        request: request.clone(),
        result: DrillResult::Failed,
        message,
        pod: base.and_then(|b| b.pod.clone()),
        message_id: base.and_then(|b| b.message_id.clone()),
        started: base.map_or_else(now, |b| b.started.clone()),
        released: base.is_some_and(|b| b.released),
    };
    match &previous {
        Some(p) if p.request == request && p.result != DrillResult::Running => None,
        Some(p) if p.request == request => Some(follow(ctx, pods, token, p, replay_reason).await),
        _ => {
            // a new request: queue the test message on the first ready pod
            let Some(token) = token else {
                return Some(fail("no admin token yet".into(), None));
            };
            let pod = pods
                .iter()
                .filter(|p| is_ready(p))
                .min_by_key(|p| p.name_any());
            let Some((pod, ip)) = pod.and_then(|p| pod_ip(p).map(|ip| (p, ip))) else {
                return Some(fail("no ready mx-pod to run the drill on".into(), None));
            };
            let domain = bmx.spec.domains.first().cloned().unwrap_or_default();
            let id = match ctx.pods.drill(ip, token, &domain).await {
                Ok(id) => id,
                Err(e) => return Some(fail(format!("cannot queue the test message: {e}"), None)),
            };
            let mut status = DrillStatus {
                request: request.clone(),
                result: DrillResult::Running,
                message: format!(
                    "test message {id} to postmaster@{domain} queued on {}",
                    pod.name_any()
                ),
                pod: Some(pod.name_any()),
                message_id: Some(id.clone()),
                started: now(),
                released: false,
            };
            match ctx.pods.message(ip, token, &id).await {
                Ok(Some(m)) if m["held"] == true => {}
                Ok(other) => {
                    return Some(fail(
                        format!("test message {id} is not held in the queue: {other:?}"),
                        Some(&status),
                    ));
                }
                Err(e) => {
                    return Some(fail(
                        format!("cannot read test message {id}: {e}"),
                        Some(&status),
                    ));
                }
            }
            if let Err(e) = ctx.pods.release(ip, token, &id).await {
                return Some(fail(
                    format!("cannot release test message {id}: {e}"),
                    Some(&status),
                ));
            }
            status.released = true;
            status.message = format!("{}; released for delivery", status.message);
            Some(status)
        }
    }
}

/// Follows a running drill's message.
async fn follow(
    ctx: &Context,
    pods: &[Pod],
    token: Option<&str>,
    d: &DrillStatus,
    replay_reason: crate::replay_control::ReplayReason,
) -> DrillStatus {
    let mut next = d.clone();
    let (Some(pod_name), Some(id)) = (&d.pod, &d.message_id) else {
        next.result = DrillResult::Failed;
        next.message = "drill state lost".into();
        return next;
    };
    let Some(ip) = pods
        .iter()
        .find(|p| &p.name_any() == pod_name)
        .and_then(pod_ip)
    else {
        next.result = DrillResult::Failed;
        next.message = format!("pod {pod_name} is gone; the test message stays in its queue");
        return next;
    };
    let Some(token) = token else {
        next.message = "no admin token to follow the test message with".into();
        return next;
    };
    let message = match ctx.pods.message(ip, token, id).await {
        Ok(m) => m,
        Err(e) => {
            next.message = format!("cannot read test message {id}: {e}");
            return next;
        }
    };
    let rcpt = message
        .as_ref()
        .map(|m| m["recipients"][0].clone())
        .unwrap_or(Value::Null);
    let status = &rcpt["status"];
    let state = status["state"]
        .as_str()
        .or_else(|| status.as_str())
        .unwrap_or("");
    let reply = status["reply"].as_str().unwrap_or_default().to_string();
    match state.to_ascii_lowercase().as_str() {
        "delivered" => {
            next.result = DrillResult::Passed;
            next.message = format!("test message {id} was accepted by the primary: {reply}");
        }
        "failed" => {
            next.result = DrillResult::Failed;
            next.message = format!("test message {id} was refused by the primary: {reply}");
        }
        _ if message.is_none() => {
            next.result = DrillResult::Failed;
            next.message = format!("test message {id} is no longer known to {pod_name}");
        }
        _ => {
            let started = DateTime::parse_from_rfc3339(&d.started)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_else(|_| Utc::now());
            if (Utc::now() - started).to_std().unwrap_or_default() > TIMEOUT {
                let why = rcpt["last_error"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("replay is held ({replay_reason})"));
                next.result = DrillResult::Failed;
                next.message = format!(
                    "test message {id} was not delivered within {}s: {why}",
                    TIMEOUT.as_secs()
                );
                let _ = ctx.pods.delete(ip, token, id).await;
            }
        }
    }
    next
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
