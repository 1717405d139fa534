//! MAIL FROM (RFC 5321 4.1.1.2): opens a transaction, with the parameters of SIZE (RFC 1870),
//! 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531) and DSN's RET and ENVID (RFC 3461 4.3, 4.4).

use smtp_proto::{MAIL_BODY_8BITMIME, MAIL_RET_FULL, MAIL_RET_HDRS, MAIL_SMTPUTF8, MailFrom};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{End, Session, Transaction};
use crate::{
    queue::message::DsnRet,
    reply::{self, RejectReason},
};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// Checks the sender and what the client announced, then opens the transaction.
    pub(super) fn mail(&mut self, from: MailFrom<String>, raw: &[u8]) -> Option<End> {
        if self.helo.is_none() {
            return self.sequence_error(&reply::NEED_HELO);
        }
        if self.tx.is_some() {
            return self.sequence_error(&reply::NESTED_MAIL);
        }
        let max = self.ctx.config.smtp.max_message_size.0 as usize;
        if from.size > max {
            self.reject(RejectReason::Size, "mail");
            return None;
        }
        if !self.ctx.filters.limits.message(self.peer.ip()) {
            self.reject(RejectReason::RateLimited, "mail");
            return None;
        }
        // refuse early when the queue cannot take even this message
        if let Err(e) = self.ctx.queue.reserve(from.size.max(1) as u64) {
            self.queue_error(&e, "mail");
            return None;
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        let Some(sender) = self.path_as_written(raw, from.address, reply::BAD_SENDER) else {
            return self.count_error();
        };
        if !smtputf8 && !sender.is_ascii() {
            self.reject(RejectReason::NonAsciiAddress, "mail");
            return None;
        }
        let ret = if from.flags & MAIL_RET_FULL != 0 {
            Some(DsnRet::Full)
        } else if from.flags & MAIL_RET_HDRS != 0 {
            Some(DsnRet::Hdrs)
        } else {
            None
        };
        self.tx = Some(Transaction {
            sender,
            env_id: from.env_id,
            ret,
            smtputf8,
            eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
            declared_size: from.size,
            recipients: Vec::new(),
        });
        self.send(&reply::OK_MAIL);
        None
    }
}
