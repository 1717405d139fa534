//! Prometheus metrics, named as in the design (`mxpod_` prefix). Labels are bounded: a
//! configured domain (or `_dsn`) or a fixed reason, never free text.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    outbound::TlsFailure,
    queue::{Queue, RcptResult, damage::DamageKind},
    reply::RejectReason,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabel {
    pub domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// A delivered message: its route and whether the session ran over TLS.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabel {
    pub domain: String,
    /// `yes` or `no`.
    pub tls: String,
}

/// A TLS failure towards a primary or a DSN server.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabel {
    pub domain: String,
    pub reason: String,
}

/// A kind of queue damage (`queue::damage::DamageKind`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DamageLabel {
    pub what: String,
}

/// Every metric mx-pod exports; clone the handles where they are counted.
pub struct Metrics {
    registry: Registry,
    pub queue_messages: Family<DomainLabel, Gauge>,
    pub queue_bytes: Family<DomainLabel, Gauge>,
    pub queue_oldest_age_seconds: Family<DomainLabel, Gauge<f64, AtomicU64>>,
    pub queue_disk_bytes: Gauge,
    pub queue_corrupt_records: Counter,
    pub queue_damage: Family<DamageLabel, Gauge>,
    pub queue_damaged_segments: Gauge,
    pub accepted: Counter,
    pub rejected: Family<ReasonLabel, Counter>,
    pub delivered: Family<DomainLabel, Counter>,
    pub deferred: Family<DomainLabel, Counter>,
    pub bounced: Family<ReasonLabel, Counter>,
    pub delivered_messages: Family<DeliveryLabel, Counter>,
    pub tls_failures: Family<TlsFailureLabel, Counter>,
    pub replay_unknown_outcome: Family<DomainLabel, Counter>,
    pub replay_workers: Gauge,
    pub smtp_sessions: Gauge,
    pub data_inflight: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mxpod");
        let m = Metrics {
            queue_messages: Family::default(),
            queue_bytes: Family::default(),
            queue_oldest_age_seconds: Family::default(),
            queue_disk_bytes: Gauge::default(),
            queue_corrupt_records: Counter::default(),
            queue_damage: Family::default(),
            queue_damaged_segments: Gauge::default(),
            accepted: Counter::default(),
            rejected: Family::default(),
            delivered: Family::default(),
            deferred: Family::default(),
            bounced: Family::default(),
            delivered_messages: Family::default(),
            tls_failures: Family::default(),
            replay_unknown_outcome: Family::default(),
            replay_workers: Gauge::default(),
            smtp_sessions: Gauge::default(),
            data_inflight: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "queue_messages",
            "Messages queued, per domain",
            m.queue_messages.clone(),
        );
        registry.register(
            "queue_bytes",
            "Bytes queued, per domain",
            m.queue_bytes.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest queued message, per domain",
            m.queue_oldest_age_seconds.clone(),
        );
        registry.register(
            "queue_disk_bytes",
            "Bytes the queue log takes on disk",
            m.queue_disk_bytes.clone(),
        );
        registry.register(
            "queue_corrupt_records",
            "Damaged queue log records found since start (at recovery or when a body was read); each is listed under damage in GET /v1/queue",
            m.queue_corrupt_records.clone(),
        );
        registry.register(
            "queue_damage",
            "Unacknowledged damage in the queue directory, by what (record_*, body_checksum, segment_header, missing_segment, manifest, holds_missing, holds_unreadable); ends with mx-pod queue repair (holds: hold/release)",
            m.queue_damage.clone(),
        );
        registry.register(
            "queue_damaged_segments",
            "Queue log segments with unacknowledged damage (kept on disk until mx-pod queue repair), missing ones included",
            m.queue_damaged_segments.clone(),
        );
        registry.register(
            "accepted",
            "Messages accepted (250 after DATA)",
            m.accepted.clone(),
        );
        registry.register(
            "rejected",
            "Commands or messages refused, by reason",
            m.rejected.clone(),
        );
        registry.register(
            "delivered",
            "Recipients delivered to the primary, per domain",
            m.delivered.clone(),
        );
        registry.register(
            "deferred",
            "Recipient delivery attempts that failed temporarily, per domain",
            m.deferred.clone(),
        );
        registry.register(
            "bounced",
            "Recipients bounced to the sender (DSN), by reason",
            m.bounced.clone(),
        );
        registry.register(
            "delivered_messages",
            "Messages committed by the primary (or a DSN server), per domain and whether the session ran over TLS",
            m.delivered_messages.clone(),
        );
        registry.register(
            "tls_failures",
            "Sessions to a primary or DSN server where TLS failed, per domain and reason (not_offered, refused, handshake, certificate); under tls policy may the mail then went in plaintext, otherwise it was deferred",
            m.tls_failures.clone(),
        );
        registry.register(
            "replay_unknown_outcome",
            "Deliveries whose connection was lost after the final dot, before the reply: the message is sent again and may arrive twice, per domain",
            m.replay_unknown_outcome.clone(),
        );
        registry.register(
            "replay_workers",
            "Replay workers currently allowed to deliver",
            m.replay_workers.clone(),
        );
        registry.register(
            "smtp_sessions",
            "Open inbound SMTP sessions",
            m.smtp_sessions.clone(),
        );
        registry.register(
            "smtp_data_inflight_bytes",
            "Memory taken by message bodies being received, of smtp.max_inflight_data",
            m.data_inflight.clone(),
        );
        for r in RejectReason::ALL {
            let _ = m.rejected.get_or_create(&ReasonLabel {
                reason: r.as_str().into(),
            });
        }
        Metrics { registry, ..m }
    }

    /// Counts a refusal.
    pub fn reject(&self, reason: RejectReason) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str().into(),
            })
            .inc();
    }

    /// Creates the per-route delivery series of `domain` (TLS, unknown outcomes) at zero, so
    /// dashboards and alerts see zeros, not gaps.
    pub fn route_series(&self, domain: &str) {
        let _ = self.replay_unknown_outcome.get_or_create(&DomainLabel {
            domain: domain.into(),
        });
        for tls in ["yes", "no"] {
            let _ = self.delivered_messages.get_or_create(&DeliveryLabel {
                domain: domain.into(),
                tls: tls.into(),
            });
        }
        for f in TlsFailure::ALL {
            let _ = self.tls_failures.get_or_create(&TlsFailureLabel {
                domain: domain.into(),
                reason: f.as_str().into(),
            });
        }
    }

    /// Counts a TLS failure of a session towards `domain`'s server.
    pub fn tls_failure(&self, domain: &str, failure: TlsFailure) {
        self.tls_failures
            .get_or_create(&TlsFailureLabel {
                domain: domain.into(),
                reason: failure.as_str().into(),
            })
            .inc();
    }

    /// Counts the TLS failure a `may` session fell back to plaintext from, if any.
    pub fn tls_fallback(&self, domain: &str, fallback: Option<TlsFailure>) {
        if let Some(f) = fallback {
            self.tls_failure(domain, f);
        }
    }

    /// Counts a delivery to `domain`'s server whose outcome is unknown (lost after the dot).
    pub fn unknown_outcome(&self, domain: &str) {
        self.replay_unknown_outcome
            .get_or_create(&DomainLabel {
                domain: domain.into(),
            })
            .inc();
    }

    /// Counts a message the server committed (at least one recipient delivered).
    pub fn delivered_message(&self, domain: &str, results: &[(usize, RcptResult)], tls: bool) {
        if results
            .iter()
            .any(|(_, r)| matches!(r, RcptResult::Delivered(_)))
        {
            self.delivered_messages
                .get_or_create(&DeliveryLabel {
                    domain: domain.into(),
                    tls: if tls { "yes" } else { "no" }.into(),
                })
                .inc();
        }
    }

    /// Refreshes the queue gauges and renders the Prometheus text format.
    pub fn render(&self, queue: &Queue, domains: &[String]) -> String {
        self.queue_messages.clear();
        self.queue_bytes.clear();
        self.queue_oldest_age_seconds.clear();
        let now = crate::queue::message::now_micros();
        for d in domains {
            let l = DomainLabel { domain: d.clone() };
            self.queue_messages.get_or_create(&l).set(0);
            self.queue_bytes.get_or_create(&l).set(0);
            self.queue_oldest_age_seconds.get_or_create(&l).set(0.0);
        }
        for s in queue.stats() {
            let l = DomainLabel {
                domain: s.route.clone(),
            };
            self.queue_messages.get_or_create(&l).set(s.messages as i64);
            self.queue_bytes.get_or_create(&l).set(s.bytes as i64);
            let age = s
                .oldest_arrival
                .map(|a| now.saturating_sub(a) as f64 / 1e6)
                .unwrap_or(0.0);
            self.queue_oldest_age_seconds.get_or_create(&l).set(age);
        }
        self.queue_disk_bytes.set(queue.disk_bytes() as i64);
        let found = queue.corrupt_records_found();
        let counted = self.queue_corrupt_records.get();
        if found > counted {
            self.queue_corrupt_records.inc_by(found - counted);
        }
        let damage = queue.damage();
        for k in DamageKind::ALL {
            let n = damage.iter().filter(|d| d.what == k).count();
            self.queue_damage
                .get_or_create(&DamageLabel {
                    what: k.as_str().into(),
                })
                .set(n as i64);
        }
        let segments: std::collections::BTreeSet<&str> =
            damage.iter().filter_map(|d| d.segment.as_deref()).collect();
        self.queue_damaged_segments.set(segments.len() as i64);
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
