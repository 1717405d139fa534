//! The expiry sweep: mail past `queue.retention` is bounced to its sender, mail past
//! `queue.delay_warning` gets its one delay warning; each sweep also bounces the messages
//! recovery found damaged.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use super::{
    Replay,
    outcome::{Bounce, pending, wants_dsn},
};
use crate::dsn::DsnKind;
use crate::queue::message::now_micros;

impl Replay {
    /// Bounces expired mail and sends delay warnings.
    pub(super) async fn expiry_loop(self, shutdown: CancellationToken) {
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
            let pending = pending(&job, |r| {
                let why = r
                    .last_error
                    .clone()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default();
                format!("550 5.4.7 Delivery time expired after {}{why}", q.retention)
            });
            if wants_dsn(&job, DsnKind::Failed, &pending) {
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
            let pending = pending(&job, |r| {
                r.last_error
                    .clone()
                    .unwrap_or_else(|| "451 4.4.1 primary mail server not reachable yet".into())
            });
            if wants_dsn(&job, DsnKind::Delayed, &pending)
                && let Err(e) = self.queue_dsn(&job, DsnKind::Delayed, &pending, None).await
            {
                error!(id = %job.env.id, error = %e, "cannot queue the delay DSN");
                continue;
            }
            if let Err(e) = self.inner.queue.mark_delay_warned(job.env.id).await {
                debug!(id = %job.env.id, error = %e, "delay warning not recorded");
            }
        }
    }
}
