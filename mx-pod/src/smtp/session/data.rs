//! DATA (RFC 5321 4.1.1.4): receives the message up to the exact CRLF "." CRLF, checks and
//! filters it, adds our Received header (RFC 5321 4.4) and queues it before answering `250`.

use std::time::Duration;

use smtp_proto::request::receiver::{DataReceiver, DummyDataReceiver};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tracing::info;

use super::{End, Session, Transaction, sanitize};
use crate::{
    config::AuthMode,
    policy::{self, rspamd::ScanRequest},
    queue::message::{ClientInfo, Envelope, MessageKind, now_micros},
    reply::{self, RejectReason, Reply},
    smtp::budget::Held,
};

/// Longest wait for memory (`smtp.max_inflight_data`) before a message is refused `451 4.3.2`
/// (at most half of `smtp.data_timeout`).
const BUDGET_WAIT: Duration = Duration::from_secs(60);

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The DATA command: `354` once a transaction has a recipient, then the message.
    pub(super) async fn data(&mut self) -> std::io::Result<Option<End>> {
        let Some(tx) = self.tx.as_ref() else {
            return Ok(self.sequence_error(&reply::NEED_MAIL));
        };
        if tx.recipients.is_empty() {
            return Ok(self.sequence_error(&reply::NO_RECIPIENTS));
        }
        self.send(&reply::START_DATA);
        let end = self.receive().await;
        // the body's memory is given back however `receive` ended (queued, refused, cut off):
        // the gauge follows here, once, rather than on each of its exits
        let in_use = self.ctx.data_budget.in_use();
        self.ctx.metrics.data_inflight.set(in_use as i64);
        end
    }

    /// Receives the message after `354`, checks it and queues it.
    async fn receive(&mut self) -> std::io::Result<Option<End>> {
        let max = self.ctx.config.smtp.max_message_size.0 as usize;
        let declared = self.tx.as_ref().map_or(0, |t| t.declared_size.min(max));
        let mut receiver = DataReceiver::new();
        let mut overflow: Option<DummyDataReceiver> = None;
        // the whole message must arrive within data_timeout, however it trickles in
        let deadline = Instant::now() + self.ctx.config.smtp.data_timeout.0;
        // memory for the body, from the shared budget (all of a declared SIZE at once)
        let budget = self.ctx.data_budget.clone();
        // wait at most half the DATA time, so a refusal (451) still reaches the client in time
        let data_timeout = self.ctx.config.smtp.data_timeout.0;
        let budget_wait = Instant::now() + BUDGET_WAIT.min(data_timeout / 2);
        let mut held = Held::default();
        let mut busy = declared > 0 && !budget.grow(&mut held, declared + 1024, budget_wait).await;
        if busy {
            overflow = Some(DummyDataReceiver::new_data(&receiver));
        }
        let mut body: Vec<u8> = Vec::with_capacity(if busy { 0 } else { declared + 1024 });
        // The end of DATA is found here, on the raw bytes, and only an exact CRLF "." CRLF ends
        // it: smtp-proto's receiver also stops at "." CR CR LF, a smuggling vector. The
        // receiver (dot un-stuffing) is fed only the bytes before the real end; if it stops
        // earlier, the message hid a second end and is refused whole.
        let mut end = EndOfData::default();
        let mut receiver_done = false;
        let mut smuggled = false;
        loop {
            if !receiver_done && overflow.is_none() {
                // room (and budget) for what this read adds, before it is copied into the body;
                // the body grows by a quarter at a time, not by doubling: the budget counts
                // its capacity, so little of it is idle
                let ahead = self.buf.len() - self.start;
                if body.capacity() - body.len() < ahead {
                    let capacity = (body.len() + (body.len() / 4).max(64 * 1024))
                        .min(max + 64 * 1024)
                        .max(body.len() + ahead);
                    if budget.grow(&mut held, capacity, budget_wait).await {
                        body.reserve_exact(capacity - body.len());
                    } else {
                        busy = true;
                        overflow = Some(DummyDataReceiver::new_data(&receiver));
                        body = Vec::new();
                        held = Held::default();
                    }
                    self.ctx.metrics.data_inflight.set(budget.in_use() as i64);
                }
            }
            let chunk = &self.buf[self.start..];
            let found = end.scan(chunk);
            let part = &chunk[..found.unwrap_or(chunk.len())];
            if !receiver_done {
                let mut iter = part.iter();
                let done = match overflow.as_mut() {
                    Some(dummy) => dummy.ingest(&mut iter),
                    None => {
                        let done = receiver.ingest(&mut iter, &mut body);
                        if !done && body.len() > max {
                            overflow = Some(DummyDataReceiver::new_data(&receiver));
                            body = Vec::new();
                        }
                        done
                    }
                };
                if done {
                    receiver_done = true;
                    smuggled |= found.is_none() || !iter.as_slice().is_empty();
                }
            }
            self.start += part.len();
            if found.is_some() {
                smuggled |= !receiver_done;
                break;
            }
            match self.fill(deadline, false).await {
                Ok(Some(true)) => {}
                Ok(_) => return Ok(Some(End::Closed)),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    self.tx = None;
                    self.reject(RejectReason::Timeout, "data");
                    return Ok(Some(End::Dropped));
                }
                Err(e) => return Err(e),
            }
        }
        if smuggled {
            self.tx = None;
            self.reject(RejectReason::BareLineEnding, "data");
            return Ok(None);
        }
        let tx = self.tx.take().expect("DATA only runs inside a transaction");
        if busy {
            drop(held);
            self.ctx.metrics.data_inflight.set(budget.in_use() as i64);
            self.reject(RejectReason::Busy, "data");
            return Ok(None);
        }
        if overflow.is_some() || body.len() > max {
            self.reject(RejectReason::Size, "data");
            return Ok(None);
        }
        if has_bare_line_ending(&body) {
            self.reject(RejectReason::BareLineEnding, "data");
            return Ok(None);
        }
        let looped = policy::loop_guard::check(&body, self.ctx.config.smtp.max_received_headers);
        if !self.verdict(looped, "data") {
            return Ok(None);
        }
        let id = self.ctx.queue.new_id();
        let body = match self.filter_content(&tx, &id.to_string(), body).await {
            Some(b) => b,
            None => return Ok(None),
        };
        let received = self.received_header(&tx, &id.to_string());
        let mut message = Vec::with_capacity(received.len() + body.len());
        message.extend_from_slice(received.as_bytes());
        message.extend_from_slice(&body);
        drop(body);
        let reservation = match self.ctx.queue.reserve(message.len() as u64) {
            Ok(r) => r,
            Err(e) => {
                self.queue_error(&e, "data");
                return Ok(None);
            }
        };
        let envelope = Envelope {
            id,
            kind: MessageKind::Mail,
            arrival: now_micros(),
            sender: tx.sender,
            recipients: tx.recipients,
            size: message.len() as u64,
            env_id: tx.env_id,
            ret: tx.ret,
            smtputf8: tx.smtputf8,
            eight_bit: tx.eight_bit,
            client: ClientInfo {
                ip: self.peer.ip().to_string(),
                helo: self.helo.clone().unwrap_or_default(),
            },
            held: false,
            delay_warned: false,
        };
        let (from, rcpts, size) = (
            envelope.sender.clone(),
            envelope.recipients.len(),
            envelope.size,
        );
        match self.ctx.queue.enqueue(envelope, message, reservation).await {
            Ok(id) => {
                self.ctx.metrics.accepted.inc();
                info!(id = %id, client = %self.peer.ip(), from = %from, rcpts, size, "queued");
                let r = Reply::dynamic(250, "2.0.0", format!("Ok: queued as {id}"));
                self.send(&r);
            }
            Err(e) => self.queue_error(&e, "data"),
        }
        Ok(None)
    }

    /// The content checks at the end of DATA (SPF/DMARC, then rspamd), once per message.
    /// Returns the message to queue (with their headers), or `None` after a refusal.
    async fn filter_content(
        &mut self,
        tx: &Transaction,
        id: &str,
        mut body: Vec<u8>,
    ) -> Option<Vec<u8>> {
        let filters = self.ctx.filters.clone();
        let helo = self.helo.clone().unwrap_or_default();
        if let Some(auth) = &filters.auth {
            let mode = tx
                .recipients
                .iter()
                .filter_map(|r| r.address.rsplit_once('@'))
                .filter_map(|(_, d)| self.ctx.config.domain(d))
                .map(|d| d.auth)
                .max()
                .unwrap_or(AuthMode::Off);
            if mode != AuthMode::Off {
                let outcome = auth
                    .check(mode, self.peer.ip(), &helo, &tx.sender, &body)
                    .await;
                info!(id, client = %self.peer.ip(), result = %outcome.summary, "authentication");
                if !self.verdict(outcome.verdict, "data") {
                    return None;
                }
                let mut with = outcome.header.into_bytes();
                with.extend_from_slice(&policy::auth::strip_forged_results(&body, auth.hostname()));
                body = with;
            }
        }
        if let Some(rspamd) = &filters.rspamd {
            let request = ScanRequest {
                client_ip: self.peer.ip(),
                helo: &helo,
                sender: &tx.sender,
                recipients: tx.recipients.iter().map(|r| r.address.as_str()).collect(),
                queue_id: id,
                tls_version: self.io.tls_version(),
                hostname: &self.ctx.config.hostname,
            };
            let scan = rspamd.scan(&request, &body).await;
            if let Some(r) = &scan.result {
                info!(id, client = %self.peer.ip(), action = %r.action, score = r.score, "rspamd");
            }
            if !self.verdict(scan.verdict, "data") {
                return None;
            }
            if let Some(result) = &scan.result {
                body = policy::rspamd::annotate(&body, result);
            }
        }
        Some(body)
    }

    fn received_header(&self, tx: &Transaction, id: &str) -> String {
        let helo = self.helo.as_deref().unwrap_or("unknown");
        let tls = self.io.tls_version().is_some();
        let proto = match (tx.smtputf8, tls) {
            (true, true) => "UTF8SMTPS",
            (true, false) => "UTF8SMTP",
            (false, true) => "ESMTPS",
            (false, false) => "ESMTP",
        };
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S +0000");
        let for_clause = match tx.recipients.as_slice() {
            [only] => format!("\r\n\tfor <{}>", only.address),
            _ => String::new(),
        };
        // RFC 5321 4.1.3 address literals: [192.0.2.1], [IPv6:2001:db8::1]
        let literal = match self.peer.ip() {
            std::net::IpAddr::V4(a) => a.to_string(),
            std::net::IpAddr::V6(a) => format!("IPv6:{a}"),
        };
        format!(
            "Received: from {} ([{}])\r\n\tby {} (mx-pod) with {} id {}{};\r\n\t{}\r\n",
            sanitize(helo),
            literal,
            self.ctx.config.hostname,
            proto,
            id,
            for_clause,
            date
        )
    }
}

/// Finds the exact end of DATA (CRLF "." CRLF; the CRLF before the dot may be the one that
/// ended the DATA command) in raw input, across reads.
pub(super) struct EndOfData {
    /// How much of CR LF "." CR LF has been matched.
    matched: usize,
}

impl Default for EndOfData {
    fn default() -> Self {
        // DATA's own CRLF counts: an empty message is just "." CRLF
        Self { matched: 2 }
    }
}

impl EndOfData {
    const PATTERN: &'static [u8] = b"\r\n.\r\n";

    /// The offset just past the end of DATA in `chunk`, if it is there.
    pub(super) fn scan(&mut self, chunk: &[u8]) -> Option<usize> {
        for (i, &b) in chunk.iter().enumerate() {
            if b == Self::PATTERN[self.matched] {
                self.matched += 1;
                if self.matched == Self::PATTERN.len() {
                    return Some(i + 1);
                }
            } else {
                self.matched = usize::from(b == b'\r');
            }
        }
        None
    }
}

/// True when the message has a CR not followed by LF, or an LF not preceded by CR.
pub fn has_bare_line_ending(body: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in body.iter().enumerate() {
        match b {
            b'\n' if prev != b'\r' => return true,
            b'\r' if body.get(i + 1) != Some(&b'\n') => return true,
            _ => {}
        }
        prev = b;
    }
    false
}
