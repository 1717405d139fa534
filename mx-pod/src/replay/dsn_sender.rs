//! The DSN worker: one extra worker, outside `workers`, that delivers the DSN route's messages
//! to `[dsn] relay` when set, else to the MX of the sender's domain, so that bounces go out while
//! the primaries are down.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::{
    Replay, now,
    throttle::{RouteHealth, backoff},
};
use crate::outbound::{AtOnce, ClientError, Rcpt};
use crate::queue::{Job, RcptResult, index::DSN_ROUTE};

impl Replay {
    /// Delivers DSNs: one at a time, independent of `workers`.
    pub(super) async fn dsn_worker(self, shutdown: CancellationToken) {
        let mut health = RouteHealth::default();
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let now = now();
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
                        super::now(),
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
