//! What replay knows of each route (a domain's primary): failures and `421`s back it off and
//! limit its concurrency ([`RouteHealth`]), each counted as a setback that withdraws the younger
//! messages waiting for their commit turn; with `replay.auto`, the prober says which primaries
//! are up, and the mail of the others is withheld.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Replay, lock, now, throttle::RouteHealth};
use crate::queue::{Job, index::DSN_ROUTE};

impl Replay {
    /// Deliveries in flight on a route. Takes the queue lock: never call it holding `routes`.
    fn in_flight(&self, route: &str) -> usize {
        self.inner
            .queue
            .stats()
            .iter()
            .find(|s| s.route == route)
            .map_or(1, |s| s.in_flight)
    }

    /// Whether a worker may start a delivery on `route` now.
    pub(super) fn may_take(&self, route: &str, in_flight: usize) -> bool {
        if route == DSN_ROUTE {
            return false;
        }
        if self.inner.config.replay.auto
            && !lock(&self.inner.primary_up)
                .get(route)
                .copied()
                .unwrap_or(false)
        {
            return false;
        }
        lock(&self.inner.routes)
            .get(route)
            .is_none_or(|h| h.can_take(in_flight, now()))
    }

    /// How many times `route` has failed or been throttled so far.
    pub(super) fn setbacks(&self, route: &str) -> u64 {
        lock(&self.inner.routes)
            .get(route)
            .map_or(0, RouteHealth::setbacks)
    }

    /// A delivery failed as a route (or was refused with `421`): backs the route off and puts
    /// the job back at the head.
    pub(super) fn route_failed(&self, job: &Job, error: String, throttle: bool) {
        let cfg = &self.inner.config.replay;
        self.update_route(&job.route, |h, in_flight, now| {
            if throttle {
                h.throttled(now, in_flight, cfg.min_backoff.0, cfg.max_backoff.0, error);
            } else {
                h.failure(now, cfg.min_backoff.0, cfg.max_backoff.0, error);
            }
        });
        self.inner.queue.put_back(job);
    }

    /// The primary answered a transaction to its end: a success, unless it said `421` on the way.
    pub(super) fn route_answered(&self, route: &str, throttled: bool) {
        let cfg = &self.inner.config.replay;
        let workers = self.settings().workers;
        self.update_route(route, |h, in_flight, now| {
            if throttled {
                h.throttled(
                    now,
                    in_flight,
                    cfg.min_backoff.0,
                    cfg.max_backoff.0,
                    "421 from primary".into(),
                );
            } else {
                h.success(workers);
            }
        });
    }

    /// Applies `f` to the route's health, given its deliveries in flight and the time.
    fn update_route(&self, route: &str, f: impl FnOnce(&mut RouteHealth, usize, Instant)) {
        // lock order: queue before routes (queue.take calls may_take under its lock)
        let in_flight = self.in_flight(route);
        let mut routes = lock(&self.inner.routes);
        f(
            routes.entry(route.to_owned()).or_default(),
            in_flight,
            now(),
        );
    }

    /// `replay.auto`: probes each primary and lets replay deliver only to those that answer.
    pub(super) async fn probe_loop(self, shutdown: CancellationToken) {
        let cfg = self.inner.config.clone();
        loop {
            for d in &cfg.domains {
                let route = d.name.to_ascii_lowercase();
                // the domain's TLS policy: a primary that cannot take mail under it is not up
                let tls = crate::probe::ProbeTls {
                    starttls: false,
                    policy: d.tls_policy,
                    trust: &self.inner.trust,
                };
                let result = crate::probe::probe_with(
                    &d.primary,
                    &cfg.hostname,
                    cfg.replay.timeout.0.min(Duration::from_secs(10)),
                    tls,
                )
                .await;
                let up = result.is_ok();
                let was = lock(&self.inner.primary_up).insert(route.clone(), up);
                if was != Some(up) {
                    match &result {
                        Ok(r) => {
                            info!(domain = %route, primary = %d.primary, banner = %r.banner, "primary is up; replay enabled")
                        }
                        Err(e) => {
                            warn!(domain = %route, primary = %d.primary, tls_policy = %d.tls_policy, error = %e, "primary is down (or fails the TLS policy); holding its mail")
                        }
                    }
                    if up {
                        lock(&self.inner.routes)
                            .entry(route.clone())
                            .or_default()
                            .reset();
                        self.inner.queue.wake();
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.replay.probe_interval.0) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}
