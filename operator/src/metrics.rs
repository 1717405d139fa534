//! The operator's Prometheus metrics (prefix `backupmx_`): reconciles, their duration and their
//! errors per BackupMx object, the primary's health and the replay workers pushed to the pods,
//! alerts dropped because the delivery queue was full, and whether this replica leads. Labels
//! are bounded: object keys (one series per BackupMx), the error kind from
//! [`crate::Error::kind`] and the alert reason (a fixed set).

use std::time::Instant;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels naming one BackupMx.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ObjectLabels {
    pub namespace: String,
    pub name: String,
}

/// Labels of an error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub namespace: String,
    pub name: String,
    pub kind: String,
}

/// Labels of an alert about one BackupMx.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub namespace: String,
    pub name: String,
    pub alert: String,
}

/// Every metric of the operator.
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ObjectLabels, Counter>,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Family<ObjectLabels, Histogram>,
    pub leader: Gauge,
    /// 1 healthy, 0 down; absent until the first verdict.
    pub primary_healthy: Family<ObjectLabels, Gauge>,
    /// Replay workers per pod the operator decided (0: held).
    pub replay_workers: Family<ObjectLabels, Gauge>,
    /// Alerts not sent to the webhook/email because the delivery queue was full.
    pub alerts_dropped: Family<AlertLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("backupmx");
        let reconciles = Family::<ObjectLabels, Counter>::default();
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Family::<ObjectLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
        });
        let leader = Gauge::default();
        let primary_healthy = Family::<ObjectLabels, Gauge>::default();
        let replay_workers = Family::<ObjectLabels, Gauge>::default();
        let alerts_dropped = Family::<AlertLabels, Counter>::default();
        registry.register(
            "reconcile",
            "Reconcile passes per BackupMx",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconcile passes per BackupMx and error kind",
            reconcile_errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconcile passes per BackupMx",
            reconcile_duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease and runs the controller",
            leader.clone(),
        );
        registry.register(
            "primary_healthy",
            "1 while the operator's probe finds the BackupMx's primary healthy, 0 while down",
            primary_healthy.clone(),
        );
        registry.register(
            "replay_workers",
            "Replay workers per pod the operator decided for the BackupMx (0: held)",
            replay_workers.clone(),
        );
        registry.register(
            "alerts_dropped",
            "Alerts of the BackupMx not sent to its webhook/email: the delivery queue was full",
            alerts_dropped.clone(),
        );
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
            primary_healthy,
            replay_workers,
            alerts_dropped,
        }
    }
}

impl Metrics {
    /// Counts a reconcile of `namespace/name`; its duration is recorded when the guard drops.
    pub fn reconcile_started(&self, namespace: &str, name: &str) -> ReconcileTimer {
        let labels = ObjectLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.reconciles.get_or_create(&labels).inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.get_or_create(&labels).clone(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, namespace: &str, name: &str, kind: &str) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Records the replay step's verdict for `namespace/name`.
    pub fn replay_state(&self, namespace: &str, name: &str, healthy: Option<bool>, workers: u32) {
        let labels = ObjectLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match healthy {
            Some(h) => {
                self.primary_healthy
                    .get_or_create(&labels)
                    .set(i64::from(h));
            }
            None => {
                self.primary_healthy.remove(&labels);
            }
        }
        self.replay_workers
            .get_or_create(&labels)
            .set(i64::from(workers));
    }

    /// Counts an alert of `namespace/name` dropped from the delivery queue.
    pub fn alert_dropped(&self, namespace: &str, name: &str, alert: &str) {
        self.alerts_dropped
            .get_or_create(&AlertLabels {
                namespace: namespace.to_string(),
                name: name.to_string(),
                alert: alert.to_string(),
            })
            .inc();
    }

    /// Forgets the per-object gauges of a deleted BackupMx.
    pub fn forget(&self, namespace: &str, name: &str) {
        let labels = ObjectLabels {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.primary_healthy.remove(&labels);
        self.replay_workers.remove(&labels);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String cannot fail");
        out
    }
}

/// Records the reconcile duration on drop.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_and_errors_are_counted_per_object() {
        let m = Metrics::default();
        drop(m.reconcile_started("mail", "example"));
        m.reconcile_failed("mail", "example", "conflict");
        let text = m.encode();
        assert!(
            text.contains(r#"backupmx_reconcile_total{namespace="mail",name="example"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"backupmx_reconcile_errors_total{namespace="mail",name="example",kind="conflict"} 1"#
        ));
        assert!(text.contains("backupmx_reconcile_duration_seconds_count"));
    }

    #[test]
    fn primary_health_and_workers_follow_the_verdict_and_vanish_on_delete() {
        let m = Metrics::default();
        m.replay_state("mail", "example", None, 0);
        let text = m.encode();
        assert!(!text.contains("backupmx_primary_healthy{"), "{text}");
        assert!(text.contains(r#"backupmx_replay_workers{namespace="mail",name="example"} 0"#));
        m.replay_state("mail", "example", Some(true), 4);
        let text = m.encode();
        assert!(
            text.contains(r#"backupmx_primary_healthy{namespace="mail",name="example"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"backupmx_replay_workers{namespace="mail",name="example"} 4"#));
        m.replay_state("mail", "example", Some(false), 0);
        assert!(
            m.encode()
                .contains(r#"backupmx_primary_healthy{namespace="mail",name="example"} 0"#)
        );
        m.forget("mail", "example");
        let text = m.encode();
        assert!(!text.contains(r#"name="example""#), "{text}");
    }
}
