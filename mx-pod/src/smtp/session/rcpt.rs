//! RCPT TO (RFC 5321 4.1.1.3): adds a recipient once relay, rate, DNSBL and recipient checks
//! accept it, with DSN's NOTIFY and ORCPT (RFC 3461 4.1, 4.2).

use smtp_proto::{
    RCPT_NOTIFY_DELAY, RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS, RcptTo,
};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Session};
use crate::{
    policy,
    queue::message::{Notify, Recipient},
    reply::{self, RejectReason},
};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Checks one recipient and adds it to the transaction.
    pub(super) async fn rcpt(&mut self, mut to: RcptTo<String>, raw: &[u8]) -> Option<End> {
        let max = self.ctx.config.smtp.max_recipients;
        let Some(tx) = self.tx.as_ref() else {
            return self.sequence_error(&reply::NEED_MAIL);
        };
        if tx.recipients.len() >= max {
            self.reject(RejectReason::TooManyRecipients, "rcpt");
            return None;
        }
        let smtputf8 = tx.smtputf8;
        // RFC 5321 4.5.1: `RCPT TO:<postmaster>` (no domain) must be accepted; it goes
        // to the postmaster of the first configured domain (at the primary)
        // (smtp-proto gives an empty address for a path without `@`: read the line)
        if is_bare_postmaster(raw)
            && let Some(first) = self.ctx.config.domains.first()
        {
            to.address = format!("postmaster@{}", first.name);
        } else {
            let Some(address) = self.path_as_written(raw, to.address, reply::BAD_RECIPIENT) else {
                return self.count_error();
            };
            to.address = address;
        }
        if !smtputf8 && !to.address.is_ascii() {
            self.reject(RejectReason::NonAsciiAddress, "rcpt");
            return None;
        }
        let relay = policy::relay::check(&self.ctx.config, &to.address, raw);
        if !self.verdict(relay, "rcpt") {
            return self.count_error();
        }
        if !self.ctx.filters.limits.recipient(self.peer.ip()) {
            self.reject(RejectReason::RateLimited, "rcpt");
            return None;
        }
        if let Some(dnsbl) = &self.ctx.filters.dnsbl {
            if self.dnsbl.is_none() {
                self.dnsbl = Some(dnsbl.check(self.peer.ip()).await);
            }
            let listed = self.dnsbl.clone().expect("looked up above");
            if !self.verdict(listed, "rcpt") {
                return None;
            }
        }
        let domain = to
            .address
            .rsplit_once('@')
            .and_then(|(_, d)| self.ctx.config.domain(d))
            .expect("the relay check accepted only configured domains")
            .clone();
        let exists = self
            .ctx
            .filters
            .recipients
            .check(&domain, &to.address)
            .await;
        if !self.verdict(exists, "rcpt") {
            return None;
        }
        let notify = Notify {
            success: to.flags & RCPT_NOTIFY_SUCCESS != 0,
            failure: to.flags & RCPT_NOTIFY_FAILURE != 0,
            delay: to.flags & RCPT_NOTIFY_DELAY != 0,
            never: to.flags & RCPT_NOTIFY_NEVER != 0,
            explicit: to.flags
                & (RCPT_NOTIFY_SUCCESS
                    | RCPT_NOTIFY_FAILURE
                    | RCPT_NOTIFY_DELAY
                    | RCPT_NOTIFY_NEVER)
                != 0,
        };
        let rcpt = Recipient::new(to.address, to.orcpt, notify);
        if let Some(tx) = self.tx.as_mut() {
            tx.recipients.push(rcpt);
        }
        self.send(&reply::OK_RCPT);
        None
    }
}

/// True for `RCPT TO:<postmaster>` (any case, parameters allowed): the one address without a
/// domain RFC 5321 4.5.1 requires a server to accept.
fn is_bare_postmaster(raw_line: &[u8]) -> bool {
    let Some(lt) = raw_line.iter().position(|&b| b == b'<') else {
        return false;
    };
    let rest = &raw_line[lt + 1..];
    rest.iter()
        .position(|&b| b == b'>')
        .is_some_and(|gt| rest[..gt].eq_ignore_ascii_case(b"postmaster"))
}
