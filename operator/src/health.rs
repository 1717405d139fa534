//! The primary's health: an SMTP probe (mx-pod's own [`mx_pod::probe`]: connect, `220`, EHLO,
//! QUIT) every `interval`, judged with hysteresis so one slow answer does not flap replay.
//!
//! - [`Hysteresis`] is the pure state machine: `failureThreshold` failures in a row make a primary
//!   down, `successThreshold` successes in a row make it up; until either, it is unknown (and
//!   unknown holds replay like down does).
//! - [`Probers`] runs one probe task per BackupMx, restarted when its target or settings change,
//!   and wakes the controller on every transition, so a decision reaches the pods at once.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{info, warn};

/// Counts consecutive results and decides up or down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hysteresis {
    failure_threshold: u32,
    success_threshold: u32,
    /// `None` until a threshold is first reached.
    pub healthy: Option<bool>,
    ok_in_a_row: u32,
    failed_in_a_row: u32,
}

impl Hysteresis {
    pub fn new(failure_threshold: u32, success_threshold: u32) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            success_threshold: success_threshold.max(1),
            healthy: None,
            ok_in_a_row: 0,
            failed_in_a_row: 0,
        }
    }

    /// Takes one probe result; `Some(new state)` when the state changes.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.ok_in_a_row += 1;
            self.failed_in_a_row = 0;
        } else {
            self.failed_in_a_row += 1;
            self.ok_in_a_row = 0;
        }
        let next = if self.ok_in_a_row >= self.success_threshold {
            Some(true)
        } else if self.failed_in_a_row >= self.failure_threshold {
            Some(false)
        } else {
            self.healthy
        };
        if next != self.healthy {
            self.healthy = next;
            next
        } else {
            None
        }
    }
}

/// What to probe and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSettings {
    /// `host:port` of the primary.
    pub target: String,
    /// Name sent with EHLO.
    pub helo: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
    /// Probe with STARTTLS and a TLS handshake too.
    pub starttls: bool,
    /// The delivery's TLS policy: `encrypt`/`verify` make STARTTLS part of health, `verify`
    /// checks the certificate as delivery will.
    pub tls_policy: mx_pod::trust::TlsPolicy,
    /// The CA bundle (`spec.caBundle`), trusted besides the Mozilla roots.
    pub ca_pem: Option<String>,
}

/// The last known health of one primary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The `host:port` this is about.
    pub target: String,
    /// `None` while unknown.
    pub healthy: Option<bool>,
    /// When the current state began.
    pub since: Option<DateTime<Utc>>,
    pub last_probe: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// The last probe failed on TLS (STARTTLS missing or refused, handshake, certificate):
    /// the primary answers SMTP but cannot take mail under the TLS policy.
    pub tls_failed: bool,
    /// The banner of the last good probe.
    pub banner: Option<String>,
}

struct Prober {
    settings: ProbeSettings,
    health: Arc<Mutex<Health>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One prober per BackupMx (`namespace/name`).
#[derive(Default)]
pub struct Probers {
    probers: Mutex<HashMap<String, Prober>>,
    /// Woken on every transition (feeds the controller's "reconcile all" trigger).
    wake: Arc<Mutex<Option<UnboundedSender<()>>>>,
    /// Tests of the reconciler: record the settings, probe nothing.
    disabled: bool,
}

impl Probers {
    /// Probers; call [`Probers::subscribe`] to be woken on transitions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Probers that never probe (the mocked-API tests: no network).
    pub fn disabled() -> Self {
        Self {
            disabled: true,
            ..Self::default()
        }
    }

    /// A new channel woken on every transition (the previous subscriber is dropped).
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<()> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.wake.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// Makes sure `key` is probed with `settings` (restarting its prober when they changed).
    pub fn ensure(&self, key: &str, settings: ProbeSettings) {
        let mut probers = self.probers.lock().unwrap_or_else(|e| e.into_inner());
        if probers.get(key).is_some_and(|p| p.settings == settings) {
            return;
        }
        let health = Arc::new(Mutex::new(Health {
            target: settings.target.clone(),
            ..Health::default()
        }));
        // disabled: a prober that never probes, so the health stays unknown
        let task = if self.disabled {
            tokio::spawn(async {})
        } else {
            tokio::spawn(run(
                key.to_string(),
                settings.clone(),
                health.clone(),
                self.wake.clone(),
            ))
        };
        probers.insert(
            key.to_string(),
            Prober {
                settings,
                health,
                task,
            },
        );
    }

    /// The current health of `key`'s primary, if probed.
    pub fn health(&self, key: &str) -> Option<Health> {
        let probers = self.probers.lock().unwrap_or_else(|e| e.into_inner());
        probers
            .get(key)
            .map(|p| p.health.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Stops probing `key`.
    pub fn remove(&self, key: &str) {
        self.probers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

async fn run(
    key: String,
    settings: ProbeSettings,
    health: Arc<Mutex<Health>>,
    wake: Arc<Mutex<Option<UnboundedSender<()>>>>,
) {
    let trust = match &settings.ca_pem {
        // checked when the bundle was read (reconcile/trust.rs): it parses
        Some(pem) => {
            mx_pod::trust::Trust::with_pem(pem.as_bytes(), "spec.caBundle").unwrap_or_default()
        }
        None => mx_pod::trust::Trust::webpki(),
    };
    let tls = mx_pod::probe::ProbeTls {
        starttls: settings.starttls,
        policy: settings.tls_policy,
        trust: &trust,
    };
    let mut h = Hysteresis::new(settings.failure_threshold, settings.success_threshold);
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result =
            mx_pod::probe::probe_with(&settings.target, &settings.helo, settings.timeout, tls)
                .await;
        let now = Utc::now();
        let ok = result.is_ok();
        let changed = h.observe(ok);
        {
            let mut hs = health.lock().unwrap_or_else(|e| e.into_inner());
            hs.last_probe = Some(now);
            match &result {
                Ok(r) => {
                    hs.banner = Some(r.banner.clone());
                    hs.last_error = None;
                    hs.tls_failed = false;
                }
                Err(e) => {
                    hs.last_error = Some(e.to_string());
                    hs.tls_failed = e.tls_failure().is_some();
                }
            }
            if let Some(up) = changed {
                hs.healthy = Some(up);
                hs.since = Some(now);
            }
        }
        if let Some(up) = changed {
            if up {
                info!(backupmx = %key, primary = %settings.target, "primary is up");
            } else {
                warn!(backupmx = %key, primary = %settings.target,
                    error = %result.err().map(|e| e.to_string()).unwrap_or_default(), "primary is down");
            }
            if let Some(w) = wake.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                let _ = w.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_decide_and_single_blips_do_not_flap() {
        let mut h = Hysteresis::new(3, 2);
        // (probe result, verdict change expected, why)
        let steps = [
            (true, None, "one success is not enough from unknown"),
            (true, Some(true), "two in a row"),
            (false, None, ""),
            (
                true,
                None,
                "a single failure between successes changes nothing",
            ),
            (false, None, ""),
            (false, None, ""),
            (false, Some(false), "three in a row"),
            (true, None, ""),
            (false, None, "a single success does not bring it back"),
            (true, None, ""),
            (true, Some(true), ""),
        ];
        for (i, (ok, verdict, why)) in steps.into_iter().enumerate() {
            assert_eq!(h.observe(ok), verdict, "step {i}: {why}");
        }
        assert_eq!(h.healthy, Some(true));
    }

    #[tokio::test]
    async fn a_prober_reports_a_dead_primary_and_wakes_the_controller() {
        let probers = Probers::new();
        let mut rx = probers.subscribe();
        probers.ensure(
            "mail/example",
            ProbeSettings {
                target: "127.0.0.1:1".into(),
                helo: "mx2.example.test".into(),
                interval: Duration::from_millis(20),
                timeout: Duration::from_secs(1),
                failure_threshold: 2,
                success_threshold: 1,
                starttls: false,
                tls_policy: mx_pod::trust::TlsPolicy::May,
                ca_pem: None,
            },
        );
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        let h = probers.health("mail/example").unwrap();
        assert_eq!(h.healthy, Some(false));
        assert!(h.last_error.is_some());
        assert_eq!(h.target, "127.0.0.1:1");
        probers.remove("mail/example");
        assert!(probers.health("mail/example").is_none());
    }
}
