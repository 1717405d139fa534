//! Replay: delivering the queue to the primaries, in arrival order, throttled.
//!
//! `workers` concurrent delivery tasks take jobs oldest first (see `queue::index`); 0 holds
//! everything. A worker keeps its connection for the next job of the same route, up to
//! `max_messages_per_connection`. All workers share one rate limiter (`rate_per_second`).
//!
//! Order: with any number of workers the primary receives a route's mail in arrival order.
//! Workers connect, send the envelope and transfer the data in parallel, but each holds back
//! the final dot (the commit point at the primary) until no older message of its route is
//! still in flight ([`CommitOrder`]). A slow connection or a slow primary process therefore
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

pub mod throttle;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use crate::outbound::{AtOnce, ClientError, CommitTurn, Rcpt, SmtpClient, Timeouts};
use crate::{
    config::Config,
    dsn::{self, DsnKind, DsnRecipient},
    metrics::{DomainLabel, Metrics, ReasonLabel},
    queue::{Job, Queue, RcptResult, index::DSN_ROUTE, message::now_micros},
};

use crate::trust::{TlsPolicy, Trust};
use throttle::{RateLimiter, RouteHealth, backoff};

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
        let now = Instant::now();
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
    fn may_take(&self, route: &str, in_flight: usize) -> bool {
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
            .is_none_or(|h| h.can_take(in_flight, Instant::now()))
    }

    async fn worker(self, index: usize, shutdown: CancellationToken) {
        let mut rx = self.inner.settings.subscribe();
        let mut conn: Conn = None;
        debug!(worker = index, "replay worker started");
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if index >= rx.borrow_and_update().workers {
                close(&mut conn).await;
                tokio::select! {
                    _ = rx.changed() => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            }
            let prefer = conn.as_ref().map(|(k, _)| k.route.clone());
            let job = self
                .inner
                .queue
                .take(prefer.as_deref(), |route, n| self.may_take(route, n));
            let Some(job) = job else {
                close(&mut conn).await;
                tokio::select! {
                    _ = self.inner.queue.wait_for_work(Duration::from_secs(1)) => {}
                    _ = rx.changed() => {}
                    _ = shutdown.cancelled() => break,
                }
                continue;
            };
            self.deliver(job, &mut conn).await;
        }
        close(&mut conn).await;
        debug!(worker = index, "replay worker stopped");
    }

    /// Delivers one job to its route's primary and records the outcome.
    async fn deliver(&self, job: Job, conn: &mut Conn) {
        // before anything can wait: a failure of an older message from here on withdraws this one
        let setbacks = self.setbacks(&job.route);
        let cfg = &self.inner.config;
        let Some(domain) = cfg.domain(&job.route) else {
            error!(id = %job.env.id, route = %job.route, "no configured domain for queued mail; holding it");
            self.route_failed(&job, "domain no longer configured".into(), false);
            return;
        };
        let at = lock(&self.inner.limiter).reserve(Instant::now());
        tokio::time::sleep_until(at.into()).await;
        let body = match self.inner.queue.read_body(&job) {
            Ok(b) => b,
            Err(e) => return self.damaged(&job, &e.to_string()).await,
        };
        let rcpts = job.recipients();
        let turn = CommitOrder {
            replay: self,
            job: &job,
            setbacks,
        };
        let mut attempt = 0;
        // connections are kept per target server: a change of target (a drain forwarding to
        // another backup) never reuses a connection to the old one
        let forward_to = self.forward_to();
        // a drain's hop to another pod of this backup MX stays inside the cluster and that pod
        // may have no certificate: STARTTLS when offered, as between MTAs
        let policy = if forward_to.is_some() {
            TlsPolicy::May
        } else {
            domain.tls_policy
        };
        let target = forward_to.unwrap_or_else(|| domain.primary.clone());
        let outcome = loop {
            attempt += 1;
            let reused = conn.as_ref().is_some_and(|(k, c)| {
                k.route == job.route
                    && k.target == target
                    && c.usable()
                    && c.sent < cfg.replay.max_messages_per_connection
            });
            if !reused {
                close(conn).await;
                match self.open(&target, policy, &job.route).await {
                    Ok(c) => {
                        let key = ConnKey {
                            route: job.route.clone(),
                            target: target.clone(),
                        };
                        *conn = Some((key, c))
                    }
                    Err(e) => break Err(e),
                }
            }
            let (_, client) = conn.as_mut().expect("connected above");
            let wire: Vec<(usize, Rcpt)> = rcpts.iter().map(|(i, r)| (*i, r.rcpt())).collect();
            match client
                .send(&job.env.transaction(), &wire, &body, &turn)
                .await
            {
                // a reused connection the primary had already closed: retry once on a new one.
                // Only then: never while the old connection might still commit the message
                Err(e) if reused && attempt == 1 && e.is_stale_connection() => {
                    debug!(id = %job.env.id, error = %e, "reused connection failed; reconnecting");
                    close(conn).await;
                }
                other => break other,
            }
        };
        // a failed session is closed before the message goes back to the queue
        if outcome.is_err() || conn.as_ref().is_some_and(|(_, c)| !c.usable()) {
            close(conn).await;
        }
        match outcome {
            Err(ClientError::Withdrawn) => {
                info!(id = %job.env.id, route = %job.route, "withdrawn before commit: an older message failed; back in the queue behind it");
                self.inner.queue.put_back(&job);
            }
            Err(e) if e.is_unknown_outcome() => {
                warn!(id = %job.env.id, route = %job.route, primary = %target, error = %e, "possible duplicate: connection lost after the final dot; the message stays queued and is sent again");
                self.inner.metrics.unknown_outcome(&job.route);
                self.route_failed(&job, e.to_string(), false);
            }
            Err(e) => {
                warn!(id = %job.env.id, route = %job.route, primary = %domain.primary, tls_policy = %policy, error = %e, "delivery failed; keeping the message at the head of the queue");
                self.route_failed(&job, e.to_string(), e.is_throttle());
            }
            Ok(tx) => {
                let tls = conn.as_ref().is_some_and(|(_, c)| c.tls.is_some());
                self.inner
                    .metrics
                    .delivered_message(&job.route, &tx.results, tls);
                {
                    // lock order: queue before routes (queue.take calls may_take under its lock)
                    let in_flight = self.in_flight(&job.route);
                    let mut routes = lock(&self.inner.routes);
                    let h = routes.entry(job.route.clone()).or_default();
                    if tx.throttled {
                        h.throttled(
                            Instant::now(),
                            in_flight,
                            cfg.replay.min_backoff.0,
                            cfg.replay.max_backoff.0,
                            "421 from primary".into(),
                        );
                    } else {
                        h.success(self.settings().workers);
                    }
                }
                self.record(&job, tx.results, Some(&body)).await;
            }
        }
    }

    /// Opens a session to `target` under `policy` for `route` (a domain, or the DSN route) and
    /// counts what TLS did: a `may` session that fell back to plaintext, or a TLS failure.
    async fn open(
        &self,
        target: &str,
        policy: TlsPolicy,
        route: &str,
    ) -> Result<SmtpClient, ClientError> {
        let cfg = &self.inner.config;
        let timeouts = Timeouts::rfc5321(cfg.replay.timeout.0, cfg.replay.final_reply_timeout.0);
        let opened =
            SmtpClient::open(target, &cfg.hostname, timeouts, policy, &self.inner.trust).await;
        match &opened {
            Ok(c) => self.inner.metrics.tls_fallback(route, c.tls_fallback),
            Err(e) => {
                if let Some(f) = e.tls_failure() {
                    self.inner.metrics.tls_failure(route, f);
                }
            }
        }
        opened
    }

    /// How many times `route` has failed or been throttled so far.
    fn setbacks(&self, route: &str) -> u64 {
        lock(&self.inner.routes)
            .get(route)
            .map_or(0, RouteHealth::setbacks)
    }

    fn route_failed(&self, job: &Job, error: String, throttle: bool) {
        let cfg = &self.inner.config.replay;
        {
            // lock order: queue before routes (queue.take calls may_take under its lock)
            let in_flight = self.in_flight(&job.route);
            let mut routes = lock(&self.inner.routes);
            let h = routes.entry(job.route.clone()).or_default();
            let now = Instant::now();
            if throttle {
                h.throttled(now, in_flight, cfg.min_backoff.0, cfg.max_backoff.0, error);
            } else {
                h.failure(now, cfg.min_backoff.0, cfg.max_backoff.0, error);
            }
        }
        self.inner.queue.put_back(job);
    }

    /// Applies per-recipient results: queues the DSN for failures first, then updates the queue.
    async fn record(&self, job: &Job, mut results: Vec<(usize, RcptResult)>, body: Option<&[u8]>) {
        let failed: Vec<(usize, String)> = results
            .iter()
            .filter_map(|(i, r)| match r {
                RcptResult::Failed(reply) => Some((*i, reply.clone())),
                _ => None,
            })
            .collect();
        if !failed.is_empty()
            && dsn::wanted(
                &job.env,
                DsnKind::Failed,
                failed.iter().map(|(i, _)| &job.env.recipients[*i]),
            )
            && let Err(e) = self.queue_dsn(job, DsnKind::Failed, &failed, body).await
        {
            // without its DSN a failure would be silent: retry the recipients later instead
            error!(id = %job.env.id, error = %e, "cannot queue the DSN; deferring the failed recipients");
            for (_, r) in results.iter_mut() {
                if let RcptResult::Failed(reply) = r {
                    *r = RcptResult::Deferred(format!("{reply} (DSN could not be queued)"));
                }
            }
        }
        let domain = DomainLabel {
            domain: job.route.clone(),
        };
        for (i, r) in &results {
            let addr = &job.env.recipients[*i].address;
            match r {
                RcptResult::Delivered(reply) => {
                    self.inner.metrics.delivered.get_or_create(&domain).inc();
                    info!(id = %job.env.id, to = %addr, route = %job.route, reply = %reply, "delivered");
                }
                RcptResult::Deferred(reply) => {
                    self.inner.metrics.deferred.get_or_create(&domain).inc();
                    warn!(id = %job.env.id, to = %addr, route = %job.route, reply = %reply, "deferred");
                }
                RcptResult::Failed(reply) => {
                    self.inner
                        .metrics
                        .bounced
                        .get_or_create(&Bounce::Rejected.label())
                        .inc();
                    warn!(id = %job.env.id, to = %addr, route = %job.route, reply = %reply, "bounced");
                }
            }
        }
        let cfg = &self.inner.config.replay;
        let (min, max) = (cfg.min_backoff.0, cfg.max_backoff.0);
        self.inner
            .queue
            .complete(job, &results, |n| backoff(n, min, max));
    }

    /// Queues a DSN about `job` for the given recipients; durable when this returns `Ok`.
    async fn queue_dsn(
        &self,
        job: &Job,
        kind: DsnKind,
        rcpts: &[(usize, String)],
        body: Option<&[u8]>,
    ) -> Result<(), crate::queue::QueueError> {
        let cfg = &self.inner.config;
        let list: Vec<DsnRecipient> = rcpts
            .iter()
            .map(|(i, diag)| {
                let r = &job.env.recipients[*i];
                DsnRecipient {
                    address: r.address.clone(),
                    orcpt: r.orcpt.clone(),
                    diagnostic: diag.clone(),
                }
            })
            .collect();
        let retry_until = (kind == DsnKind::Delayed)
            .then(|| job.env.arrival + cfg.queue.retention.0.as_micros() as u64);
        let id = self.inner.queue.new_id();
        let report = dsn::Report {
            kind,
            recipients: &list,
            original: body,
            retry_until,
        };
        let (env, dsn_body) = dsn::build(id, &cfg.hostname, &job.env, &report, now_micros());
        let reservation = self.inner.queue.reserve(dsn_body.len() as u64)?;
        self.inner.queue.enqueue(env, dsn_body, reservation).await?;
        info!(id = %job.env.id, dsn = %id, kind = ?kind, to = %job.env.sender, "DSN queued");
        Ok(())
    }

    /// A body that fails its checksum is never delivered: it is saved to `corrupt/` and the
    /// sender is told.
    async fn damaged(&self, job: &Job, error: &str) {
        error!(id = %job.env.id, error, "queued message is damaged; not delivering it");
        self.save_corrupt(job, error);
        let reply = "554 5.3.0 message damaged in the backup MX queue".to_owned();
        let results: Vec<(usize, RcptResult)> = job
            .recipients()
            .iter()
            .map(|(i, _)| (*i, RcptResult::Failed(reply.clone())))
            .collect();
        self.inner
            .metrics
            .bounced
            .get_or_create(&Bounce::Corrupt.label())
            .inc();
        self.record(job, results, None).await;
    }

    /// Ends a claimed message for its `pending` recipients (index, the reply they fail with),
    /// counted in `mxpod_bounced_total{reason}`; the DSN, if any, is already queued.
    fn fail_pending(&self, job: &Job, pending: &[(usize, String)], reason: Bounce) {
        let results: Vec<(usize, RcptResult)> = pending
            .iter()
            .map(|(i, why)| (*i, RcptResult::Failed(why.clone())))
            .collect();
        self.inner.queue.complete(job, &results, |_| Duration::ZERO);
        self.inner
            .metrics
            .bounced
            .get_or_create(&reason.label())
            .inc_by(pending.len() as u64);
    }

    /// Saves a damaged message's envelope (and why) as `corrupt/<id>.json`, synced: it is what
    /// is left of the message once it leaves the queue.
    fn save_corrupt(&self, job: &Job, error: &str) {
        use std::io::Write;
        let dir = self.inner.queue.dir().join("corrupt");
        let path = dir.join(format!("{}.json", job.env.id));
        let saved = std::fs::create_dir_all(&dir).and_then(|_| {
            let mut f = std::fs::File::create(&path)?;
            f.write_all(
                &serde_json::to_vec_pretty(
                    &serde_json::json!({"error": error, "envelope": job.env}),
                )
                .unwrap_or_default(),
            )?;
            f.sync_all()?;
            std::fs::File::open(&dir)?.sync_all()
        });
        if let Err(e) = saved {
            error!(id = %job.env.id, error = %e, path = %path.display(), "cannot save the damaged message's envelope");
        }
    }

    /// Messages whose record was damaged (recovery read their envelope, not their body): each
    /// goes to `corrupt/` and every pending recipient fails with a DSN to the sender, whatever
    /// the state of the primaries. A DSN that cannot be queued leaves the message for the next
    /// sweep.
    pub async fn bounce_damaged(&self) {
        for (job, why) in self.inner.queue.claim_damaged() {
            error!(id = %job.env.id, from = %job.env.sender, error = %why, "message damaged in the queue log; not delivering it, bouncing it");
            let reply = format!("554 5.3.0 message damaged in the backup MX queue ({why})");
            let pending: Vec<(usize, String)> = job
                .env
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.status.is_final())
                .map(|(i, _)| (i, reply.clone()))
                .collect();
            if dsn::wanted(
                &job.env,
                DsnKind::Failed,
                pending.iter().map(|(i, _)| &job.env.recipients[*i]),
            ) && let Err(e) = self.queue_dsn(&job, DsnKind::Failed, &pending, None).await
            {
                error!(id = %job.env.id, error = %e, "cannot queue the DSN of a damaged message; keeping it");
                self.inner.queue.unclaim(&job);
                continue;
            }
            self.save_corrupt(&job, &why);
            self.fail_pending(&job, &pending, Bounce::Corrupt);
        }
    }

    /// Delivers DSNs: one at a time, independent of `workers`.
    async fn dsn_worker(self, shutdown: CancellationToken) {
        let mut health = RouteHealth::default();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let now = Instant::now();
            let job = self.inner.queue.take(None, |route, n| {
                route == DSN_ROUTE && health.can_take(n, now)
            });
            let Some(job) = job else {
                tokio::select! {
                    _ = self.inner.queue.wait_for_work(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            };
            let cfg = &self.inner.config;
            let result = self.send_dsn(&job).await;
            match result {
                Ok(results) => {
                    health.success(1);
                    for (i, r) in &results {
                        if let RcptResult::Failed(reply) = r {
                            // never bounce a bounce
                            warn!(id = %job.env.id, to = %job.env.recipients[*i].address, reply = %reply, "DSN refused; dropped");
                        }
                    }
                    let (min, max) = (cfg.replay.min_backoff.0, cfg.replay.max_backoff.0);
                    self.inner
                        .queue
                        .complete(&job, &results, |n| backoff(n, min, max));
                }
                Err(e) => {
                    warn!(id = %job.env.id, error = %e, "DSN delivery failed; will retry");
                    health.failure(
                        Instant::now(),
                        cfg.replay.min_backoff.0,
                        cfg.replay.max_backoff.0,
                        e.to_string(),
                    );
                    self.inner.queue.put_back(&job);
                }
            }
        }
    }

    async fn send_dsn(&self, job: &Job) -> Result<Vec<(usize, RcptResult)>, ClientError> {
        let cfg = &self.inner.config;
        let body = match self.inner.queue.read_body(job) {
            Ok(b) => b,
            Err(e) => {
                error!(id = %job.env.id, error = %e, "damaged DSN dropped");
                return Ok(job
                    .recipients()
                    .iter()
                    .map(|(i, _)| (*i, RcptResult::Failed(e.to_string())))
                    .collect());
            }
        };
        let rcpts = job.recipients();
        let domain = rcpts
            .first()
            .map(|(_, r)| r.domain.clone())
            .unwrap_or_default();
        let targets = match &cfg.dsn.relay {
            Some(relay) => vec![relay.clone()],
            None => mx_targets(&domain, cfg.dsn.resolver).await?,
        };
        let mut last = None;
        let policy = cfg.dsn.tls_policy;
        for target in targets {
            match self.open(&target, policy, DSN_ROUTE).await {
                Ok(mut c) => {
                    let wire: Vec<(usize, Rcpt)> =
                        rcpts.iter().map(|(i, r)| (*i, r.rcpt())).collect();
                    let r = c.send(&job.env.transaction(), &wire, &body, &AtOnce).await;
                    let tls = c.tls.is_some();
                    c.quit().await;
                    match r {
                        Ok(tx) => {
                            self.inner
                                .metrics
                                .delivered_message(DSN_ROUTE, &tx.results, tls);
                            return Ok(tx.results);
                        }
                        // this server may still commit it: no other one gets it meanwhile
                        Err(e) if e.is_unknown_outcome() => {
                            warn!(id = %job.env.id, server = %target, error = %e, "possible duplicate: connection lost after the final dot; the DSN stays queued and is sent again");
                            self.inner.metrics.unknown_outcome(DSN_ROUTE);
                            return Err(e);
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(e) => {
                    warn!(id = %job.env.id, server = %target, tls_policy = %policy, error = %e, "DSN server failed");
                    last = Some(e)
                }
            }
        }
        Err(last.unwrap_or(ClientError::Protocol(format!(
            "no mail server found for {domain}"
        ))))
    }

    /// Bounces expired mail and sends delay warnings.
    async fn expiry_loop(self, shutdown: CancellationToken) {
        let q = &self.inner.config.queue;
        let every = (q.delay_warning.0.min(q.retention.0) / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        self.bounce_damaged().await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.cancelled() => return,
            }
            self.bounce_damaged().await;
            self.expire_once().await;
        }
    }

    /// One expiry sweep (public for tests).
    pub async fn expire_once(&self) {
        let q = &self.inner.config.queue;
        let work = self
            .inner
            .queue
            .expiry_scan(now_micros(), q.retention.0, q.delay_warning.0);
        for job in work.expired {
            let pending: Vec<(usize, String)> = job
                .env
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.status.is_final())
                .map(|(i, r)| {
                    let why = r
                        .last_error
                        .clone()
                        .map(|e| format!("; last error: {e}"))
                        .unwrap_or_default();
                    (
                        i,
                        format!("550 5.4.7 Delivery time expired after {}{why}", q.retention),
                    )
                })
                .collect();
            if dsn::wanted(
                &job.env,
                DsnKind::Failed,
                pending.iter().map(|(i, _)| &job.env.recipients[*i]),
            ) {
                let body = self.inner.queue.read_body_of(job.env.id).ok();
                if let Err(e) = self
                    .queue_dsn(&job, DsnKind::Failed, &pending, body.as_deref())
                    .await
                {
                    error!(id = %job.env.id, error = %e, "cannot queue the expiry DSN; keeping the message");
                    self.inner.queue.unclaim(&job);
                    continue;
                }
            } else if job.env.kind == crate::queue::message::MessageKind::Dsn {
                warn!(id = %job.env.id, to = %job.env.sender, "undeliverable DSN expired; dropped");
            }
            self.fail_pending(&job, &pending, Bounce::Expired);
            warn!(id = %job.env.id, from = %job.env.sender, recipients = pending.len(), "expired after retention; bounced");
        }
        for job in work.delayed {
            let pending: Vec<(usize, String)> = job
                .env
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| !r.status.is_final())
                .map(|(i, r)| {
                    (
                        i,
                        r.last_error.clone().unwrap_or_else(|| {
                            "451 4.4.1 primary mail server not reachable yet".into()
                        }),
                    )
                })
                .collect();
            if dsn::wanted(
                &job.env,
                DsnKind::Delayed,
                pending.iter().map(|(i, _)| &job.env.recipients[*i]),
            ) && let Err(e) = self.queue_dsn(&job, DsnKind::Delayed, &pending, None).await
            {
                error!(id = %job.env.id, error = %e, "cannot queue the delay DSN");
                continue;
            }
            if let Err(e) = self.inner.queue.mark_delay_warned(job.env.id).await {
                debug!(id = %job.env.id, error = %e, "delay warning not recorded");
            }
        }
    }

    /// `replay.auto`: probes each primary and lets replay deliver only to those that answer.
    async fn probe_loop(self, shutdown: CancellationToken) {
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

/// A delivery's commit turn: its final dot goes out only when no older message of its route is
/// in flight, so the primary commits the route's mail in arrival order whatever the number of
/// workers. Withdrawn when the route failed (or was throttled) since the job was taken: the
/// older message that failed goes back to the head, and this one must not pass it.
struct CommitOrder<'a> {
    replay: &'a Replay,
    job: &'a Job,
    /// The route's setbacks when the job was taken.
    setbacks: u64,
}

impl CommitOrder<'_> {
    fn route_unchanged(&self) -> bool {
        self.replay.setbacks(&self.job.route) == self.setbacks
    }
}

impl CommitTurn for CommitOrder<'_> {
    fn ready(&self) -> bool {
        self.replay.inner.queue.is_turn(self.job) && self.route_unchanged()
    }

    async fn wait(&self) -> bool {
        self.replay.inner.queue.wait_turn(self.job).await;
        self.route_unchanged()
    }
}

/// What a worker's open connection serves: a route, at a target server.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ConnKey {
    route: String,
    target: String,
}

/// A worker's open connection, kept for the next job of the same route and target.
type Conn = Option<(ConnKey, SmtpClient)>;

async fn close(conn: &mut Conn) {
    if let Some((_, c)) = conn.take() {
        c.quit().await;
    }
}

/// The hosts to try for `domain`'s mail, by MX preference (the domain itself when it has no MX).
async fn mx_targets(
    domain: &str,
    resolver: Option<std::net::SocketAddr>,
) -> Result<Vec<String>, ClientError> {
    let resolver = crate::resolver::resolver(resolver, Duration::from_secs(10))
        .map_err(ClientError::Protocol)?;
    match resolver.mx_lookup(domain).await {
        Ok(mx) => {
            let mut v: Vec<(u16, String)> = mx
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    hickory_resolver::proto::rr::RData::MX(m) => Some((
                        m.preference,
                        m.exchange.to_ascii().trim_end_matches('.').to_owned(),
                    )),
                    _ => None,
                })
                .collect();
            v.sort();
            Ok(v.into_iter().map(|(_, h)| format!("{h}:25")).collect())
        }
        Err(e) if e.is_no_records_found() => Ok(vec![format!("{domain}:25")]),
        Err(e) => Err(ClientError::Protocol(format!(
            "MX lookup of {domain} failed: {e}"
        ))),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Why recipients bounced: the `reason` of `mxpod_bounced_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bounce {
    /// The primary refused them (`5xx`).
    Rejected,
    /// Their message was damaged in the queue log.
    Corrupt,
    /// Still undelivered after `queue.retention`.
    Expired,
}

impl Bounce {
    fn label(self) -> ReasonLabel {
        let reason = match self {
            Bounce::Rejected => "rejected",
            Bounce::Corrupt => "corrupt",
            Bounce::Expired => "expired",
        };
        ReasonLabel {
            reason: reason.into(),
        }
    }
}
