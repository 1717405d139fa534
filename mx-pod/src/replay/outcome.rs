//! What becomes of a message after a delivery: per-recipient results go to the queue, failures
//! get their DSN queued first, and damaged messages are filed in `corrupt/` and bounced. All of
//! it is counted in the delivery metrics (`mxpod_bounced_total{reason}` for bounces).

use std::time::Duration;

use tracing::{error, info, warn};

use super::{Replay, throttle::backoff};
use crate::{
    dsn::{self, DsnKind, DsnRecipient},
    metrics::{DomainLabel, ReasonLabel},
    queue::{
        Job, RcptResult,
        message::{Recipient, now_micros},
    },
};

impl Replay {
    /// Applies per-recipient results: queues the DSN for failures first, then updates the queue.
    /// Failed recipients are counted as bounced for `reason`.
    pub(super) async fn record(
        &self,
        job: &Job,
        mut results: Vec<(usize, RcptResult)>,
        body: Option<&[u8]>,
        reason: Bounce,
    ) {
        let failed: Vec<(usize, String)> = results
            .iter()
            .filter_map(|(i, r)| match r {
                RcptResult::Failed(reply) => Some((*i, reply.clone())),
                _ => None,
            })
            .collect();
        if !failed.is_empty()
            && wants_dsn(job, DsnKind::Failed, &failed)
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
                        .get_or_create(&reason.label())
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
    pub(super) async fn queue_dsn(
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
    /// sender is told; each recipient counts once, as a `corrupt` bounce.
    pub(super) async fn damaged(&self, job: &Job, error: &str) {
        error!(id = %job.env.id, error, "queued message is damaged; not delivering it");
        self.save_corrupt(job, error);
        let reply = "554 5.3.0 message damaged in the backup MX queue".to_owned();
        let results: Vec<(usize, RcptResult)> = job
            .recipients()
            .iter()
            .map(|(i, _)| (*i, RcptResult::Failed(reply.clone())))
            .collect();
        self.record(job, results, None, Bounce::Corrupt).await;
    }

    /// Ends a claimed message for its `pending` recipients (index, the reply they fail with),
    /// counted in `mxpod_bounced_total{reason}`; the DSN, if any, is already queued.
    pub(super) fn fail_pending(&self, job: &Job, pending: &[(usize, String)], reason: Bounce) {
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
            let pending = pending(&job, |_| reply.clone());
            if wants_dsn(&job, DsnKind::Failed, &pending)
                && let Err(e) = self.queue_dsn(&job, DsnKind::Failed, &pending, None).await
            {
                error!(id = %job.env.id, error = %e, "cannot queue the DSN of a damaged message; keeping it");
                self.inner.queue.unclaim(&job);
                continue;
            }
            self.save_corrupt(&job, &why);
            self.fail_pending(&job, &pending, Bounce::Corrupt);
        }
    }
}

/// The recipients of `job` not yet delivered or failed, each with the reply `reply` gives it.
pub(super) fn pending(job: &Job, reply: impl Fn(&Recipient) -> String) -> Vec<(usize, String)> {
    let recipients = job.env.recipients.iter().enumerate();
    recipients
        .filter(|(_, r)| !r.status.is_final())
        .map(|(i, r)| (i, reply(r)))
        .collect()
}

/// Whether the sender asked for a DSN of `kind` about any of these recipients of `job`.
pub(super) fn wants_dsn(job: &Job, kind: DsnKind, rcpts: &[(usize, String)]) -> bool {
    let recipients = rcpts.iter().map(|(i, _)| &job.env.recipients[*i]);
    dsn::wanted(&job.env, kind, recipients)
}

/// Why recipients bounced: the `reason` of `mxpod_bounced_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Bounce {
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
