//! The delivery workers: each takes the oldest job it may (see [`Replay::may_take`]), delivers
//! it over a connection it keeps for the next job of the same route and target, and holds the
//! final dot until the message's commit turn ([`CommitOrder`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Replay, lock, now, outcome::Bounce};
use crate::outbound::{ClientError, CommitTurn, Rcpt, SmtpClient, Timeouts};
use crate::queue::Job;
use crate::trust::TlsPolicy;

impl Replay {
    /// Worker number `index`: delivers while `index` is below the `workers` setting.
    pub(super) async fn worker(self, index: usize, shutdown: CancellationToken) {
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
        let at = lock(&self.inner.limiter).reserve(now());
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
                self.route_answered(&job.route, tx.throttled);
                self.record(&job, tx.results, Some(&body), Bounce::Rejected)
                    .await;
            }
        }
    }

    /// Opens a session to `target` under `policy` for `route` (a domain, or the DSN route) and
    /// counts what TLS did: a `may` session that fell back to plaintext, or a TLS failure.
    pub(super) async fn open(
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
