//! Policy: what the backup MX accepts, decided before anything is queued.
//!
//! Each check returns a [`Verdict`]; a rejection carries its [`RejectReason`], which gives the
//! SMTP reply, the log field and the metric label. This checks are the relay rule and
//! the loop guard; content filters (rspamd, DNSBL, recipient verification) plug in here as
//! further checks at RCPT or end of DATA, so a refusal is always given in the SMTP dialogue and
//! never as a later bounce (no backscatter).

pub mod loop_guard;
pub mod relay;

use crate::smtp::reply::RejectReason;

/// The outcome of a policy check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Reject(RejectReason),
}
