//! Replay: delivering the queue to the primaries, in arrival order, throttled.
//!
//! `workers` concurrent delivery tasks take jobs oldest first (see `queue::index`); 0 holds
//! everything. A worker keeps its connection for the next job of the same route, up to
//! `max_messages_per_connection`. All workers share one rate limiter (`rate_per_second`).
//!
//! Order: with any number of workers the primary receives a route's mail in arrival order.
//! Workers connect, send the envelope and transfer the data in parallel, but each holds back
//! the final dot (the commit point at the primary) until no older message of its route is
//! still in flight ([`CommitOrder`](worker::CommitOrder)). A slow connection or a slow primary process therefore
//! delays the younger messages instead of letting them overtake. When an older message fails
//! as a route (connection lost, `421`), the younger ones waiting for their turn are withdrawn
//! (connection closed before the dot, the primary discards the unfinished message) and go back
//! to the queue behind it, so the order holds across failures too. What may still reorder: a
//! recipient the primary defers with its own `4xx` is retried after its backoff.
//!
//! Delivered means a `2xx` to the message's final dot, nothing else. A protocol violation by
//! the primary (a `250` to DATA, an unsolicited or malformed reply, see `crate::outbound`) drops the
//! connection and is a route-level failure. A connection lost after the dot, before its reply,
//! leaves the outcome unknown: the message is sent again (at least once) and the possible
//! duplicate is logged and counted (`mxpod_replay_unknown_outcome_total`); the reply to the dot
//! is awaited `replay.final_reply_timeout` (10 minutes) so that a slow commit is not one.
//!
//! Failures: a route-level failure (connection refused, timeout, bad greeting) puts the job
//! back at the head and backs the route off exponentially; a `421` also halves the number of
//! concurrent deliveries the route gets. A recipient's `4xx` defers that recipient with its own
//! backoff; its `5xx` fails it and the sender gets a DSN, queued durably before the original
//! is updated. Retention and delay warnings are handled by the expiry sweep.
//!
//! DSNs travel on their own route, served by one extra worker that does not count against
//! `workers` (so bounces still go out while the primary is down): to `[dsn] relay` when set,
//! else to the MX of the sender's domain.

//!
//! # Files
//! - `mod.rs`: the [`Replay`] handle: run-time settings, the drain target, per-route status,
//!   and [`Replay::spawn`], which starts the tasks below and grows the workers with the setting.
//! - [`worker`]: the delivery workers: taking jobs, one delivery, kept connections, and the
//!   commit turn ([`worker::CommitOrder`]).
//! - [`health`]: what replay knows of each route: route failures and `421`s (backoff, the
//!   concurrency limit, the setbacks that withdraw waiting messages), whether a worker may take
//!   a route's mail, and the `replay.auto` prober.
//! - [`outcome`]: what becomes of a message after a delivery: per-recipient results, DSNs queued
//!   for failures, damaged messages filed in `corrupt/` and bounced.
//! - [`dsn_sender`]: the DSN worker and its delivery to the relay or the sender's MX.
//! - [`expiry`]: the sweep that bounces mail past retention and sends delay warnings.
//! - [`throttle`]: the pure pacing rules: the rate limiter, route health, backoff.
//! - `tests.rs`: all of the above against a scripted primary (`outbound::script`), under
//!   tokio's paused clock.

mod dsn_sender;
mod expiry;
mod health;
mod outcome;
#[cfg(test)]
mod tests;
pub mod throttle;
mod worker;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use crate::{
    config::Config,
    metrics::{DomainLabel, Metrics, ReasonLabel},
    queue::{Queue, index::DSN_ROUTE},
    trust::{TlsPolicy, Trust},
};
use throttle::{RateLimiter, RouteHealth};

/// The replay knobs that change at run time (`PUT /v1/replay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaySettings {
    pub workers: usize,
    pub rate_per_second: u32,
}

/// One route's state, for `GET /v1/replay`.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStatus {
    pub route: String,
    /// In `auto` mode: whether the last probe found the primary up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary_up: Option<bool>,
    pub backing_off: bool,
    /// Concurrency limit after `421`s; absent when unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The TLS policy towards this route's primary.
    pub tls_policy: TlsPolicy,
}

/// The replay engine; cheap to clone.
#[derive(Clone)]
pub struct Replay {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    queue: Queue,
    metrics: Arc<Metrics>,
    settings: watch::Sender<ReplaySettings>,
    limiter: Mutex<RateLimiter>,
    routes: Mutex<HashMap<String, RouteHealth>>,
    primary_up: Mutex<HashMap<String, bool>>,
    /// While draining for a scale-down: deliver everything here instead of the primaries.
    forward_to: Mutex<Option<String>>,
    trust: Trust,
}

impl Replay {
    /// `trust` verifies primaries and DSN relays under `tls_policy = "verify"`.
    pub fn new(config: Arc<Config>, queue: Queue, metrics: Arc<Metrics>, trust: Trust) -> Self {
        let s = ReplaySettings {
            workers: config.replay.workers,
            rate_per_second: config.replay.rate_per_second,
        };
        metrics.replay_workers.set(s.workers as i64);
        // every series exists from the start, so dashboards and alerts see zeros, not gaps
        for d in &config.domains {
            let l = DomainLabel {
                domain: d.name.to_ascii_lowercase(),
            };
            let _ = metrics.delivered.get_or_create(&l);
            let _ = metrics.deferred.get_or_create(&l);
            metrics.route_series(&l.domain);
        }
        metrics.route_series(DSN_ROUTE);
        for reason in ["rejected", "expired", "corrupt"] {
            let _ = metrics.bounced.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        let (settings, _) = watch::channel(s);
        Replay {
            inner: Arc::new(Inner {
                limiter: Mutex::new(RateLimiter::new(s.rate_per_second)),
                config,
                queue,
                metrics,
                settings,
                routes: Mutex::new(HashMap::new()),
                primary_up: Mutex::new(HashMap::new()),
                forward_to: Mutex::new(None),
                trust,
            }),
        }
    }

    pub fn settings(&self) -> ReplaySettings {
        *self.inner.settings.borrow()
    }

    /// Changes workers and rate; takes effect at the next message boundary.
    pub fn set_settings(&self, s: ReplaySettings) {
        lock(&self.inner.limiter).set_rate(s.rate_per_second);
        self.inner.metrics.replay_workers.set(s.workers as i64);
        self.inner.settings.send_replace(s);
        self.inner.queue.wake();
        info!(
            workers = s.workers,
            rate_per_second = s.rate_per_second,
            "replay settings changed"
        );
    }

    /// Clears the backoff of a domain's route (or all): an admin flush tries at once.
    pub fn reset_backoff(&self, domain: Option<&str>) {
        let mut routes = lock(&self.inner.routes);
        for (name, h) in routes.iter_mut() {
            if domain.is_none_or(|d| d.eq_ignore_ascii_case(name)) {
                h.reset();
            }
        }
        drop(routes);
        self.inner.queue.wake();
    }

    /// Where every message goes instead of its primary (a drain for scale-down), if anywhere.
    pub fn forward_to(&self) -> Option<String> {
        lock(&self.inner.forward_to).clone()
    }

    /// Sends everything to `target` instead of the primaries (or back to them with `None`).
    pub fn set_forward_to(&self, target: Option<String>) {
        *lock(&self.inner.forward_to) = target;
        self.reset_backoff(None);
        self.inner.queue.wake();
    }

    /// Per-route state.
    pub fn routes(&self) -> Vec<RouteStatus> {
        let now = now();
        let health = lock(&self.inner.routes).clone();
        let up = lock(&self.inner.primary_up).clone();
        let mut out: Vec<RouteStatus> = self
            .inner
            .config
            .domains
            .iter()
            .map(|d| {
                let route = d.name.to_ascii_lowercase();
                let h = health.get(&route).cloned().unwrap_or_default();
                RouteStatus {
                    tls_policy: d.tls_policy,
                    primary_up: self
                        .inner
                        .config
                        .replay
                        .auto
                        .then(|| up.get(&route).copied().unwrap_or(false)),
                    backing_off: h.backing_off(now),
                    concurrency_limit: h.limit(),
                    last_error: h.last_error().map(str::to_owned),
                    route,
                }
            })
            .collect();
        out.sort_by(|a, b| a.route.cmp(&b.route));
        out
    }

    /// Starts the workers, the DSN worker, the expiry sweep and (with `auto`) the prober.
    pub fn spawn(&self, tracker: &TaskTracker, shutdown: CancellationToken) {
        let r = self.clone();
        let t = tracker.clone();
        let s = shutdown.clone();
        tracker.spawn(async move { r.supervise(t, s).await });
        let r = self.clone();
        let s = shutdown.clone();
        tracker.spawn(async move { r.dsn_worker(s).await });
        let r = self.clone();
        let s = shutdown.clone();
        tracker.spawn(async move { r.expiry_loop(s).await });
        if self.inner.config.replay.auto {
            let r = self.clone();
            tracker.spawn(async move { r.probe_loop(shutdown).await });
        }
    }

    /// Spawns workers as the setting grows; workers above the setting park themselves.
    async fn supervise(self, tracker: TaskTracker, shutdown: CancellationToken) {
        let mut rx = self.inner.settings.subscribe();
        let mut spawned = 0usize;
        loop {
            let want = rx.borrow_and_update().workers;
            while spawned < want {
                let r = self.clone();
                let s = shutdown.clone();
                let index = spawned;
                tracker.spawn(async move { r.worker(index, s).await });
                spawned += 1;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// The time replay paces and backs off by: tokio's clock, which is the system's except under a
/// test's paused clock (where backoffs and the rate then pass in virtual time).
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
