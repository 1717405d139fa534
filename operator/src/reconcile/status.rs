//! Status as a pure function of what a pass observed: the queue figures summed over the pods,
//! and the conditions (with `lastTransitionTime` kept while a condition's status holds).

use std::collections::BTreeMap;

use chrono::{SecondsFormat, Utc};

use super::{
    step::{Note, StepOutcome},
    trust::CA_BUNDLE_INVALID,
};
use crate::{
    crd::{
        BackupMx, BackupMxStatus, Condition, ConditionStatus, DomainQueueStatus, PodQueueStatus,
        QueueStatus, ReplayStatus, set_condition,
    },
    pod_admin::PodQueue,
};

/// Condition types the operator sets.
pub const READY: &str = "Ready";
pub const DEGRADED: &str = "Degraded";
pub const DELETING: &str = "Deleting";
/// Set by the DNS step ([`super::dns`]); kept here, with the others, so that status, which
/// carries it over, need not import dns (dns imports status for its condition).
pub const DNS_READY: &str = "DNSReady";
pub const PRIMARY_HEALTHY: &str = "PrimaryHealthy";
pub const REPLAYING: &str = "Replaying";
pub const DRAINING: &str = "Draining";

/// Sums the pods' queues; pods whose admin API failed are listed with the error.
pub fn queue_status(queues: &[PodQueue]) -> QueueStatus {
    let mut total = QueueStatus::default();
    let mut domains: BTreeMap<String, DomainQueueStatus> = BTreeMap::new();
    for q in queues {
        match &q.result {
            Ok(s) => {
                total.messages += s.messages as u64;
                total.bytes += s.bytes;
                for d in &s.domains {
                    let e = domains
                        .entry(d.domain.clone())
                        .or_insert_with(|| DomainQueueStatus {
                            domain: d.domain.clone(),
                            ..Default::default()
                        });
                    e.messages += d.messages as u64;
                    e.bytes += d.bytes;
                    e.oldest_age_seconds = e.oldest_age_seconds.max(d.oldest_age_seconds);
                    total.oldest_age_seconds = total.oldest_age_seconds.max(d.oldest_age_seconds);
                }
                total.pods.push(PodQueueStatus {
                    pod: q.pod.clone(),
                    messages: Some(s.messages as u64),
                    draining: s.draining,
                    error: None,
                });
            }
            Err(e) => total.pods.push(PodQueueStatus {
                pod: q.pod.clone(),
                messages: None,
                draining: false,
                error: Some(e.clone()),
            }),
        }
    }
    total.domains = domains.into_values().collect();
    total.pods.sort_by(|a, b| a.pod.cmp(&b.pod));
    total
}

/// A condition stamped with now and the object's generation.
pub fn condition(
    bmx: &BackupMx,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        last_transition_time: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        observed_generation: bmx.metadata.generation,
    }
}

/// What an apply pass saw.
pub struct Observed {
    pub replicas: i32,
    pub ready_replicas: i32,
    pub queues: Vec<PodQueue>,
    /// A fresh DNS result (`None`: DNS not managed, or not synced this pass).
    pub dns: Option<(crate::crd::DnsStatus, Condition)>,
    /// The replay step's outcome.
    pub replay: Option<super::replay::ReplayOutcome>,
    pub alerts: Option<crate::crd::AlertState>,
    /// `None`: the previous drill status stands.
    pub drill: Option<crate::crd::DrillStatus>,
}

/// The status step of an apply pass: the status from what the pass saw, and an event when
/// `Ready` changed (the pass publishes the events, then writes the status).
pub fn step(bmx: &BackupMx, seen: &Observed) -> (BackupMxStatus, StepOutcome) {
    let new = applied(bmx, seen);
    let event = transition(bmx, &new);
    (new, StepOutcome::events(event))
}

/// The event for a change of the `Ready` condition from `bmx`'s status to `new` (its status or
/// reason; for a refused spec, also its message): a Warning for a refused spec, news (Normal)
/// otherwise, pods still starting included.
pub fn transition(bmx: &BackupMx, new: &BackupMxStatus) -> Option<Note> {
    let now = new.condition(READY)?;
    let before = bmx.status.as_ref().and_then(|s| s.condition(READY));
    let refused = |reason: &str| reason == "InvalidSpec" || reason == CA_BUNDLE_INVALID;
    let changed = before.is_none_or(|b| {
        b.status != now.status
            || b.reason != now.reason
            || (refused(&b.reason) && b.message != now.message)
    });
    let warning = now.status == ConditionStatus::False && refused(&now.reason);
    changed.then(|| Note::new(warning, &now.reason, &now.message))
}

/// The status after a successful apply pass.
pub fn applied(bmx: &BackupMx, seen: &Observed) -> BackupMxStatus {
    let previous = bmx
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut conditions = Vec::new();
    let ready = if seen.ready_replicas >= seen.replicas && seen.replicas > 0 {
        condition(
            bmx,
            READY,
            ConditionStatus::True,
            "AllPodsReady",
            format!("{} of {} mx-pods ready", seen.ready_replicas, seen.replicas),
        )
    } else {
        condition(
            bmx,
            READY,
            ConditionStatus::False,
            "PodsNotReady",
            format!(
                "{} of {} mx-pods ready; objects applied",
                seen.ready_replicas, seen.replicas
            ),
        )
    };
    set_condition(&mut conditions, &previous, ready);
    let queue = queue_status(&seen.queues);
    let failed: Vec<String> = queue
        .pods
        .iter()
        .filter_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.pod)))
        .collect();
    // a pod whose queue directory is damaged: kept mail is safe, but an operator must look
    let damaged: Vec<String> = seen
        .queues
        .iter()
        .filter_map(|q| match &q.result {
            Ok(s) if !s.damage.is_empty() => Some(format!(
                "{}: {}",
                q.pod,
                s.damage
                    .iter()
                    .map(|d| match &d.segment {
                        Some(seg) => format!("{} in {seg}", d.what.as_str()),
                        None => d.what.as_str().to_owned(),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            _ => None,
        })
        .collect();
    let degraded = if failed.is_empty() && damaged.is_empty() {
        condition(
            bmx,
            DEGRADED,
            ConditionStatus::False,
            "AsExpected",
            "every running pod reports its queue",
        )
    } else if failed.is_empty() {
        condition(
            bmx,
            DEGRADED,
            ConditionStatus::True,
            "QueueDamaged",
            format!(
                "queue damage on {} pod(s): {}; see GET /v1/queue of the pod, then mx-pod queue repair",
                damaged.len(),
                damaged.join("; ")
            ),
        )
    } else {
        condition(
            bmx,
            DEGRADED,
            ConditionStatus::True,
            "QueueUnreadable",
            format!(
                "admin API of {} pod(s) failed: {}",
                failed.len(),
                failed.join("; ")
            ),
        )
    };
    set_condition(&mut conditions, &previous, degraded);
    let previous_dns = bmx.status.as_ref().and_then(|s| s.dns.clone());
    let dns = match &seen.dns {
        Some((status, condition)) => {
            set_condition(&mut conditions, &previous, condition.clone());
            Some(status.clone())
        }
        None if bmx.spec.dns.is_some() => {
            if let Some(c) = previous.iter().find(|c| c.type_ == DNS_READY) {
                conditions.push(c.clone());
            }
            previous_dns
        }
        None => None,
    };
    let prev_status = bmx.status.clone().unwrap_or_default();
    let (replay, primary, maintenance) = match &seen.replay {
        Some(r) => {
            let (status, reason, message) = match r.healthy {
                Some(true) => (
                    ConditionStatus::True,
                    "PrimaryUp",
                    format!("{} answers SMTP", r.primary.target),
                ),
                Some(false) => (
                    ConditionStatus::False,
                    // answers SMTP, but not under the TLS policy: a different fix
                    if r.tls_failed {
                        "PrimaryTlsFailed"
                    } else {
                        "PrimaryDown"
                    },
                    format!(
                        "{}: {}",
                        r.primary.target,
                        r.primary.last_error.as_deref().unwrap_or("no answer")
                    ),
                ),
                None => (
                    ConditionStatus::Unknown,
                    "NotProbedYet",
                    format!("{} not judged yet", r.primary.target),
                ),
            };
            set_condition(
                &mut conditions,
                &previous,
                condition(bmx, PRIMARY_HEALTHY, status, reason, message),
            );
            let replaying = if r.decision.workers > 0 {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            };
            set_condition(
                &mut conditions,
                &previous,
                condition(
                    bmx,
                    REPLAYING,
                    replaying,
                    r.decision.reason.as_str(),
                    r.decision.message.clone(),
                ),
            );
            // Draining: True while pods drain, False once they are done (written only when it
            // was there before)
            let draining = if !r.draining.is_empty() {
                let left: Vec<String> = r
                    .draining
                    .iter()
                    .map(|(p, n)| {
                        format!(
                            "{p}: {}",
                            n.map_or("unknown".to_string(), |n| n.to_string())
                        )
                    })
                    .collect();
                Some((
                    ConditionStatus::True,
                    "ScaleDown",
                    format!(
                        "draining before the scale-down to {} pod(s); messages left: {}",
                        bmx.spec.replicas,
                        left.join(", ")
                    ),
                ))
            } else if previous.iter().any(|c| c.type_ == DRAINING) {
                Some((
                    ConditionStatus::False,
                    "Idle",
                    "no pod is draining".to_string(),
                ))
            } else {
                None
            };
            if let Some((status, reason, message)) = draining {
                set_condition(
                    &mut conditions,
                    &previous,
                    condition(bmx, DRAINING, status, reason, message),
                );
            }
            (
                Some(ReplayStatus {
                    workers: r.decision.workers,
                    reason: r.decision.reason.as_str().into(),
                    message: r.decision.message.clone(),
                    resumed_at: r
                        .resumed_at
                        .map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true)),
                }),
                Some(r.primary.clone()),
                (!bmx.spec.maintenance_windows.is_empty()).then(|| r.maintenance.clone()),
            )
        }
        None => (
            prev_status.replay.clone(),
            prev_status.primary.clone(),
            prev_status.maintenance.clone(),
        ),
    };
    BackupMxStatus {
        observed_generation: bmx.metadata.generation,
        conditions,
        replicas: Some(seen.replicas),
        ready_replicas: Some(seen.ready_replicas),
        queue: Some(queue),
        replay,
        dns,
        primary,
        maintenance,
        alerts: seen.alerts.clone().or(prev_status.alerts),
        drill: seen.drill.clone().or(prev_status.drill),
    }
}

/// The status of an object whose spec failed validation: the rest of the previous status stays.
pub fn invalid(bmx: &BackupMx, message: &str) -> BackupMxStatus {
    refused(bmx, "InvalidSpec", message)
}

/// The status of a spec that cannot be served: `Ready=False` with `reason` (`InvalidSpec`,
/// `CaBundleInvalid`).
pub fn refused(bmx: &BackupMx, reason: &str, message: &str) -> BackupMxStatus {
    let mut status = bmx.status.clone().unwrap_or_default();
    let previous = status.conditions.clone();
    set_condition(
        &mut status.conditions,
        &previous,
        condition(bmx, READY, ConditionStatus::False, reason, message),
    );
    status.observed_generation = bmx.metadata.generation;
    status
}

/// The status while deletion waits for mail.
pub fn deleting(
    bmx: &BackupMx,
    reason: &str,
    message: &str,
    queues: &[PodQueue],
) -> BackupMxStatus {
    let mut status = bmx.status.clone().unwrap_or_default();
    let previous = status.conditions.clone();
    set_condition(
        &mut status.conditions,
        &previous,
        condition(bmx, DELETING, ConditionStatus::True, reason, message),
    );
    status.queue = Some(queue_status(queues));
    status
}

#[cfg(test)]
mod tests {
    use mx_pod::admin::{DomainSummary, QueueSummary};

    use super::*;
    use crate::fixtures::backupmx;

    fn pod(name: &str, n: usize, age: u64) -> PodQueue {
        PodQueue {
            pod: name.into(),
            result: Ok(QueueSummary {
                messages: n,
                bytes: n as u64 * 100,
                disk_bytes: 0,
                held: false,
                draining: false,
                domains: vec![DomainSummary {
                    domain: "example.com".into(),
                    messages: n,
                    bytes: n as u64 * 100,
                    oldest_age_seconds: age,
                    held: false,
                }],
                damage: vec![],
            }),
        }
    }

    #[test]
    fn queues_are_summed_over_pods_and_domains() {
        let q = queue_status(&[
            pod("b-1", 3, 50),
            pod("b-0", 2, 90),
            PodQueue {
                pod: "b-2".into(),
                result: Err("refused".into()),
            },
        ]);
        assert_eq!(q.messages, 5);
        assert_eq!(q.oldest_age_seconds, 90);
        assert_eq!(q.domains[0].messages, 5);
        assert_eq!(q.pods[0].pod, "b-0");
        assert_eq!(q.pods[2].error.as_deref(), Some("refused"));
    }

    #[test]
    fn ready_follows_pods_and_degraded_follows_admin_errors() {
        let bmx = backupmx();
        let s = applied(
            &bmx,
            &Observed {
                replicas: 2,
                ready_replicas: 1,
                queues: vec![PodQueue {
                    pod: "example-0".into(),
                    result: Err("timeout".into()),
                }],
                dns: None,
                replay: None,
                alerts: None,
                drill: None,
            },
        );
        let ready = s.condition(READY).unwrap();
        assert_eq!(ready.status, ConditionStatus::False);
        assert_eq!(ready.reason, "PodsNotReady");
        assert_eq!(ready.observed_generation, Some(1));
        assert_eq!(s.condition(DEGRADED).unwrap().status, ConditionStatus::True);
        assert_eq!(s.observed_generation, Some(1));
    }

    #[test]
    fn queue_damage_on_a_pod_is_degraded_queue_damaged() {
        let bmx = backupmx();
        let mut q = pod("example-0", 1, 5);
        // what an mx-pod answers: the pod's JSON, as the operator reads it
        let answer = serde_json::json!({
            "messages": 1, "bytes": 100, "disk_bytes": 0, "held": false, "draining": false,
            "domains": [],
            "damage": [{"what": "record_checksum", "segment": "0000000000000002.seg",
                        "offset": 16, "len": 500, "messages": [171],
                        "detail": "record header checksum mismatch",
                        "detected": "2026-01-01T00:00:00Z"}]
        });
        q.result = Ok(serde_json::from_value(answer).unwrap());
        let seen = |queues| Observed {
            replicas: 1,
            ready_replicas: 1,
            queues,
            dns: None,
            replay: None,
            alerts: None,
            drill: None,
        };
        let s = applied(&bmx, &seen(vec![q]));
        let c = s.condition(DEGRADED).unwrap();
        assert_eq!(c.status, ConditionStatus::True);
        assert_eq!(c.reason, "QueueDamaged");
        assert!(
            c.message
                .contains("record_checksum in 0000000000000002.seg"),
            "{}",
            c.message
        );
        // a pod from before the damage list answers without it
        let old: QueueSummary = serde_json::from_value(serde_json::json!({
            "messages": 0, "bytes": 0, "disk_bytes": 0, "held": false, "draining": false,
            "domains": []
        }))
        .unwrap();
        let s = applied(
            &bmx,
            &seen(vec![PodQueue {
                pod: "example-0".into(),
                result: Ok(old),
            }]),
        );
        assert_eq!(
            s.condition(DEGRADED).unwrap().status,
            ConditionStatus::False
        );
    }
}
