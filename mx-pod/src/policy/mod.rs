//! Policy: what the backup MX accepts, decided before anything is queued.
//!
//! Each check returns a [`Verdict`]; a rejection carries its [`RejectReason`], which gives the
//! SMTP reply (or the basis of a more precise one), the log field and the metric label. Every
//! refusal is given in the SMTP dialogue, at RCPT or at the end of DATA, and never as a later
//! bounce (no backscatter).
//!
//! | when | check | module |
//! |---|---|---|
//! | connect | connections per client IP | [`limits`] |
//! | MAIL | messages per minute per client IP | [`limits`] |
//! | RCPT | relay rule (configured domains only) | [`relay`] |
//! | RCPT | recipients per minute per client IP | [`limits`] |
//! | RCPT | client IP on a DNS blocklist | [`dnsbl`] |
//! | RCPT | recipient exists (any / list / verify with the primary) | [`recipients`] |
//! | end of DATA | mail loop (`Received:` count) | [`loop_guard`] |
//! | end of DATA | SPF / DMARC | [`auth`] |
//! | end of DATA | rspamd | [`rspamd`] |

pub mod auth;
pub mod dnsbl;
pub mod limits;
pub mod loop_guard;
pub mod recipients;
pub mod relay;
pub mod rspamd;

use std::sync::Arc;

use crate::{
    config::{AuthMode, Config},
    reply::{RejectReason, Reply},
};

/// The outcome of a policy check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Refused with the reason's standard reply.
    Reject(RejectReason),
    /// Refused with a more precise reply (the list that blocked, the primary's own answer).
    RejectWith(RejectReason, Reply),
}

/// Every check that needs state or a backend, built once from the configuration and shared by
/// all sessions.
pub struct Filters {
    pub limits: Arc<limits::Limits>,
    pub dnsbl: Option<dnsbl::Dnsbl>,
    pub rspamd: Option<rspamd::Rspamd>,
    pub auth: Option<auth::Auth>,
    pub recipients: Arc<recipients::Recipients>,
}

impl Filters {
    /// Builds the filters `config` asks for; the recipient cache is kept in the queue directory.
    /// `trust` verifies rspamd's certificate when its URL is https.
    pub fn new(config: &Config, trust: &crate::trust::Trust) -> Result<Self, String> {
        let f = &config.filter;
        let dnsbl = if f.dnsbl.is_empty() {
            None
        } else {
            let resolver = crate::resolver::resolver(f.resolver, f.dns_timeout())
                .map_err(|e| format!("filter.dnsbl: {e}"))?;
            Some(dnsbl::Dnsbl::new(f.dnsbl.clone(), resolver))
        };
        let auth = if config.domains.iter().any(|d| d.auth != AuthMode::Off) {
            let (rc, opts) = crate::resolver::resolver_config(f.resolver, f.dns_timeout())
                .map_err(|e| format!("domains.auth: {e}"))?;
            let authenticator = mail_auth::MessageAuthenticator::new(rc, opts)
                .map_err(|e| format!("domains.auth: cannot build the DNS resolver: {e}"))?;
            Some(auth::Auth::new(authenticator, &config.hostname))
        } else {
            None
        };
        Ok(Self {
            limits: Arc::new(limits::Limits::new(
                config.smtp.max_connections_per_ip,
                config.smtp.max_messages_per_minute,
                config.smtp.max_recipients_per_minute,
            )),
            dnsbl,
            rspamd: f.rspamd.as_ref().map(|r| rspamd::Rspamd::new(r, trust)),
            auth,
            recipients: Arc::new(recipients::Recipients::open(
                &config.queue.dir,
                &config.hostname,
                trust.clone(),
            )),
        })
    }
}
