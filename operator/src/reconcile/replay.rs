//! Replay in the reconcile loop: probe the primary (one prober per BackupMx), decide the
//! workers ([`crate::replay_control`]), push them to every pod's admin API, and drain the
//! highest ordinals before a scale-down.
//!
//! # Scale-down
//! When `spec.replicas` is lower than the StatefulSet's, the pods above it are drained first
//! (`POST /v1/drain`: they stop accepting and deliver what they hold). While the primary takes
//! mail they deliver to it; while it does not, they forward their queue to pod 0 over SMTP. Only
//! when each reports an empty queue is the StatefulSet scaled down; their volumes are kept.
//!
//! # Cutover
//! A pod whose configuration is not the current one (its `backupmx.io/config-hash` differs:
//! a rolling update is in progress, e.g. after `spec.primary` changed) gets 0 workers, and the
//! prober of the new primary starts from "unknown": nothing reaches the old primary once the
//! change is observed, and the new one gets mail once it has proven healthy.

use std::{net::IpAddr, time::Duration};

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tracing::{info, warn};

use super::{
    Context,
    apply::{Objects, Pods},
    step::StepOutcome,
};
use crate::{
    crd::{BackupMx, MaintenanceStatus, PrimaryStatus},
    health::{Health, ProbeSettings},
    maintenance,
    pod_admin::{PodQueue, pod_ip},
    render::{CONFIG_HASH_ANNOTATION, SMTP_PORT},
    replay_control::{self, Decision, Inputs},
    validate::ValidSpec,
};

/// The ordinal of a StatefulSet pod (`name-3` → 3).
pub fn ordinal(pod: &Pod) -> Option<i32> {
    pod.name_any().rsplit_once('-')?.1.parse().ok()
}

/// What the replay step did.
pub struct ReplayOutcome {
    pub decision: Decision,
    pub primary: PrimaryStatus,
    pub maintenance: MaintenanceStatus,
    /// Pods being drained for a scale-down and what each still holds (`None`: unreadable).
    pub draining: Vec<(String, Option<u64>)>,
    /// The drained pods are empty: the StatefulSet may be scaled down.
    pub drained: bool,
    /// Pods whose admin API refused the new setting.
    pub push_errors: Vec<String>,
    /// Decide again after this long (ramp steps, window boundaries).
    pub requeue: Option<Duration>,
    /// Whether the primary is known healthy.
    pub healthy: Option<bool>,
    /// The last probe failed on TLS (the `tlsPolicy` cannot be met), not on SMTP.
    pub tls_failed: bool,
    /// When `spec.replay.paused` was last lifted (for `status.replay.resumedAt`).
    pub resumed_at: Option<DateTime<Utc>>,
}

/// The probe step: makes sure the primary `bmx` names is probed as its spec (`valid`) says,
/// trusting `bundle` under `tlsPolicy: verify`, and returns what the prober knows so far (the
/// probing itself runs in the prober's own task).
pub fn probe(
    bmx: &BackupMx,
    valid: &ValidSpec,
    ctx: &Context,
    bundle: &super::trust::Bundle,
) -> Option<Health> {
    let spec = &bmx.spec;
    let key = format!("{}/{}", bmx.namespace().unwrap_or_default(), bmx.name_any());
    let hc = &spec.primary.health_check;
    ctx.probers.ensure(
        &key,
        ProbeSettings {
            target: primary_target(bmx),
            helo: spec.mx.hostname.clone(),
            interval: valid.health_check.interval,
            timeout: valid.health_check.timeout,
            failure_threshold: hc.failure_threshold,
            success_threshold: hc.success_threshold,
            starttls: hc.start_tls,
            tls_policy: spec.primary.tls_policy.into(),
            ca_pem: bundle.pem.clone(),
        },
    );
    ctx.probers.health(&key)
}

/// The replay push step of an apply pass: [`control`] with what the objects and pods steps
/// found, its verdict recorded in the metrics; it asks to look again at the decision's next
/// change, and every 2 s while pods drain.
pub async fn step(
    bmx: &BackupMx,
    valid: &ValidSpec,
    ctx: &Context,
    objects: &Objects,
    pods: &Pods,
    health: Option<Health>,
) -> (ReplayOutcome, StepOutcome) {
    let replay = control(
        bmx,
        valid,
        ctx,
        &pods.pods,
        &pods.queues,
        Some(&objects.token),
        &objects.config_hash,
        pods.current_replicas,
        health,
    )
    .await;
    ctx.metrics.replay_state(
        &bmx.namespace().unwrap_or_default(),
        &bmx.name_any(),
        replay.healthy,
        replay.decision.workers,
    );
    let draining = (!replay.draining.is_empty()).then_some(Duration::from_secs(2));
    let outcome = StepOutcome {
        requeue: [replay.requeue, draining].into_iter().flatten().min(),
        ..StepOutcome::default()
    };
    (replay, outcome)
}

/// Decides the replay workers for `bmx` (`valid`: its spec, parsed; `health`: what the
/// [`probe`] knows), whose StatefulSet has `current_replicas`, and pushes them to the pods.
#[allow(clippy::too_many_arguments)]
pub async fn control(
    bmx: &BackupMx,
    valid: &ValidSpec,
    ctx: &Context,
    pods: &[Pod],
    queues: &[PodQueue],
    token: Option<&str>,
    config_hash: &str,
    current_replicas: i32,
    health: Option<Health>,
) -> ReplayOutcome {
    let spec = &bmx.spec;
    let target = primary_target(bmx);
    let now = Utc::now();
    let window = maintenance::evaluate(&valid.maintenance_windows, now);

    // what the pods say (also: does the primary push back?)
    let mut replays = Vec::new();
    for pod in pods {
        let Some(ip) = pod_ip(pod) else { continue };
        let replay = match token {
            Some(t) => ctx.pods.replay(ip, t).await,
            None => Err("no admin token yet".to_string()),
        };
        replays.push((pod, ip, replay));
    }
    let backoff = replays.iter().any(|(_, _, r)| {
        r.as_ref().is_ok_and(|r| {
            r.routes.iter().any(|route| {
                route["backing_off"] == true
                    || route.get("concurrency_limit").is_some_and(|v| !v.is_null())
            })
        })
    });
    let last = bmx.status.as_ref().and_then(|s| s.replay.as_ref());
    let resumed_at = replay_control::resumed_at(
        spec.replay.paused,
        last.map(|r| r.reason.as_str()),
        last.and_then(|r| r.resumed_at.as_deref())
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc)),
        now,
    );
    let inputs = Inputs {
        paused: spec.replay.paused,
        resumed_at,
        window: &window,
        health: health.as_ref(),
        target: &target,
        now,
        ramp_up: valid.replay.ramp_up,
        max_workers: spec.replay.max_workers,
        backoff,
    };
    let decision = replay_control::decide(&inputs);
    let requeue = replay_control::next_change(&inputs, &decision);

    // scale-down: the pods at or above spec.replicas drain, to the primary or to pod 0
    let draining_pods: Vec<&Pod> = if current_replicas > spec.replicas {
        pods.iter()
            .filter(|p| ordinal(p).is_some_and(|o| o >= spec.replicas))
            .collect()
    } else {
        Vec::new()
    };
    let forward_to: Option<String> = (decision.workers == 0)
        .then(|| {
            pods.iter()
                .filter(|p| ordinal(p) == Some(0))
                .find_map(pod_ip)
                .map(|ip| socket(ip, SMTP_PORT))
        })
        .flatten();

    let mut push_errors = Vec::new();
    for (pod, ip, current) in &replays {
        let name = pod.name_any();
        let stale = pod
            .annotations()
            .get(CONFIG_HASH_ANNOTATION)
            .map(String::as_str)
            != Some(config_hash);
        let drain = draining_pods.iter().any(|d| d.name_any() == name);
        let mut wanted = if stale { 0 } else { decision.workers };
        if drain {
            if let Some(t) = token {
                let to = if decision.workers > 0 {
                    None
                } else {
                    forward_to.as_deref()
                };
                if let Err(e) = ctx.pods.drain_to(*ip, t, to).await {
                    push_errors.push(format!("{name}: {e}"));
                }
            }
            // while forwarding to pod 0, the primary's throttling does not apply
            if decision.workers == 0 && forward_to.is_some() {
                wanted = spec.replay.max_workers;
            }
        }
        let rate = spec.replay.rate_per_second;
        let same = current
            .as_ref()
            .is_ok_and(|c| c.workers as u32 == wanted && c.rate_per_second == rate);
        if same {
            continue;
        }
        let Some(t) = token else {
            push_errors.push(format!("{name}: no admin token yet"));
            continue;
        };
        match ctx.pods.set_replay(*ip, t, wanted, rate).await {
            Ok(()) => {
                info!(pod = %name, workers = wanted, reason = decision.reason.as_str(), "replay workers set")
            }
            Err(e) => {
                warn!(pod = %name, error = %e, "cannot set replay workers");
                push_errors.push(format!("{name}: {e}"));
            }
        }
    }

    let draining: Vec<(String, Option<u64>)> = draining_pods
        .iter()
        .map(|p| {
            let n = p.name_any();
            let left = queues
                .iter()
                .find(|q| q.pod == n)
                .and_then(|q| q.result.as_ref().ok())
                .map(|s| s.messages as u64);
            (n, left)
        })
        .collect();
    // every pod above spec.replicas must have been seen empty (a missing pod counts: it may
    // be restarting with mail on its volume)
    let expected = (spec.replicas..current_replicas).count();
    let drained = current_replicas > spec.replicas
        && draining.len() == expected
        && draining.iter().all(|(_, left)| *left == Some(0));

    let stamp = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
    let primary = PrimaryStatus {
        target: target.clone(),
        healthy: health
            .as_ref()
            .filter(|h| h.target == target)
            .and_then(|h| h.healthy),
        since: health.as_ref().and_then(|h| h.since).map(stamp),
        last_probe: health.as_ref().and_then(|h| h.last_probe).map(stamp),
        last_error: health.as_ref().and_then(|h| h.last_error.clone()),
    };
    let maintenance = MaintenanceStatus {
        active: window.active.is_some(),
        reason: window.active.as_ref().map(|a| a.0.clone()),
        ends_at: window.active.as_ref().map(|a| stamp(a.1)),
        next_start: window.next.as_ref().map(|n| stamp(n.0)),
        next_reason: window.next.as_ref().map(|n| n.1.clone()),
    };
    ReplayOutcome {
        resumed_at,
        tls_failed: health
            .as_ref()
            .is_some_and(|h| h.target == target && h.tls_failed),
        healthy: primary.healthy,
        decision,
        primary,
        maintenance,
        draining,
        drained,
        push_errors,
        requeue,
    }
}

/// `host:port` of the primary the spec names.
pub fn primary_target(bmx: &BackupMx) -> String {
    let p = &bmx.spec.primary;
    if p.host.contains(':') && !p.host.starts_with('[') {
        format!("[{}]:{}", p.host, p.port)
    } else {
        format!("{}:{}", p.host, p.port)
    }
}

fn socket(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}
