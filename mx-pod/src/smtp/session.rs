//! One inbound SMTP session: reads commands, applies policy, receives DATA and queues the
//! message durably before answering `250`.
//!
//! Framing is strict: command lines and DATA must end in CRLF (a bare CR or LF is refused, the
//! SMTP-smuggling defence). Commands are parsed with smtp-proto; DATA is un-stuffed by its
//! `DataReceiver`. Replies are buffered and flushed only before the session waits for input,
//! which is what PIPELINING (RFC 2920) asks for. Memory per session is bounded: a command line
//! by [`MAX_LINE`], a message by `smtp.max_message_size` (the rest is read and dropped).
//!
//! Shutdown: once the token is cancelled, a session with no transaction open answers
//! `421 4.3.2` and closes; a transaction in progress may finish its DATA first.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::budget::Held;

use smtp_proto::{
    MAIL_BODY_8BITMIME, MAIL_RET_FULL, MAIL_RET_HDRS, MAIL_SMTPUTF8, RCPT_NOTIFY_DELAY,
    RCPT_NOTIFY_FAILURE, RCPT_NOTIFY_NEVER, RCPT_NOTIFY_SUCCESS, Request,
    request::receiver::{DataReceiver, DummyDataReceiver},
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    proxy,
    tls::{Io, Tls},
};
use crate::{
    address,
    config::{AuthMode, Config},
    metrics::Metrics,
    policy::{self, Filters, Verdict, rspamd::ScanRequest},
    queue::{
        Queue, QueueError,
        message::{ClientInfo, DsnRet, Envelope, MessageKind, Notify, Recipient, now_micros},
    },
    reply::{self, RejectReason, Reply},
};

/// Longest command line accepted, CRLF included (RFC 5321 asks for at least 512).
pub const MAX_LINE: usize = 4096;
/// How long a load balancer may take to send its PROXY header.
const PROXY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS handshake may take.
const TLS_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for memory (`smtp.max_inflight_data`) before a message is refused `451 4.3.2`
/// (at most half of `smtp.data_timeout`).
const BUDGET_WAIT: Duration = Duration::from_secs(60);

/// What every session shares.
pub struct SessionContext {
    pub config: Arc<Config>,
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    pub filters: Arc<Filters>,
    /// STARTTLS, when `smtp.tls` is configured.
    pub tls: Option<Arc<Tls>>,
    /// Memory for message bodies in transit, shared by all sessions.
    pub data_budget: Arc<super::budget::DataBudget>,
}

struct Transaction {
    sender: String,
    env_id: Option<String>,
    ret: Option<DsnRet>,
    smtputf8: bool,
    eight_bit: bool,
    declared_size: usize,
    recipients: Vec<Recipient>,
}

/// Why a session ends.
enum End {
    /// The client said QUIT or hung up.
    Closed,
    /// We said 421 and hang up.
    Dropped,
}

/// One SMTP session over any byte stream (TCP in production, memory in tests).
pub struct Session<S> {
    io: Io<S>,
    ctx: Arc<SessionContext>,
    /// The client: the TCP peer, or the address a PROXY header named.
    peer: SocketAddr,
    shutdown: CancellationToken,
    buf: Vec<u8>,
    start: usize,
    out: Vec<u8>,
    helo: Option<String>,
    tx: Option<Transaction>,
    errors: usize,
    /// The DNSBL verdict on this client, looked up at its first recipient.
    dnsbl: Option<Verdict>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(
        io: S,
        ctx: Arc<SessionContext>,
        peer: SocketAddr,
        shutdown: CancellationToken,
    ) -> Self {
        Session {
            io: Io::Plain(io),
            ctx,
            peer,
            shutdown,
            buf: Vec::with_capacity(8192),
            start: 0,
            out: Vec::with_capacity(1024),
            helo: None,
            tx: None,
            errors: 0,
            dnsbl: None,
        }
    }

    /// Runs the session to its end. I/O errors end it quietly (the client went away).
    pub async fn run(mut self) {
        if let Err(e) = self.serve().await {
            debug!(peer = %self.peer, error = %e, "session ended by I/O error");
        }
    }

    async fn serve(&mut self) -> std::io::Result<()> {
        if self.shutdown.is_cancelled() {
            self.reject(RejectReason::Shutdown, "connect");
            return self.flush().await;
        }
        if self.ctx.config.smtp.proxy_protocol && !self.read_proxy_header().await? {
            return self.flush().await;
        }
        let Some(_slot) = self.ctx.filters.limits.connect(self.peer.ip()) else {
            self.reject(RejectReason::TooManyConnectionsFromIp, "connect");
            return self.flush().await;
        };
        let banner = Reply::dynamic(
            220,
            "",
            format!("{} ESMTP mx-pod", self.ctx.config.hostname),
        );
        self.send(&banner);
        // a session ends when `command` says how (QUIT, hang-up, or our 421)
        while self.command().await?.is_none() {}
        self.flush().await?;
        let _ = self.io.shutdown().await;
        Ok(())
    }

    fn send(&mut self, reply: &Reply) {
        reply.write_to(&mut self.out);
    }

    /// Writes the pending replies. A client that does not read them within
    /// `smtp.write_timeout` is closed: it would pin the session, its buffers and a connection
    /// slot.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.out.is_empty() {
            let write = async {
                self.io.write_all(&self.out).await?;
                self.io.flush().await
            };
            match tokio::time::timeout(self.ctx.config.smtp.write_timeout.0, write).await {
                Ok(r) => r?,
                Err(_) => {
                    self.ctx.metrics.reject(RejectReason::Timeout);
                    info!(client = %self.peer.ip(), "client does not read its replies; closing");
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "client does not read",
                    ));
                }
            }
            self.out.clear();
        }
        Ok(())
    }

    /// Sends the reply for a refusal, counts it and logs it with the client and the reply.
    fn reject(&mut self, reason: RejectReason, stage: &str) {
        self.reject_with(reason, reason.reply(), stage);
    }

    /// Like [`Session::reject`] with a more precise reply.
    fn reject_with(&mut self, reason: RejectReason, reply: Reply, stage: &str) {
        self.ctx.metrics.reject(reason);
        info!(client = %self.peer.ip(), stage, reason = reason.as_str(), reply = %reply, "refused");
        self.send(&reply);
    }

    /// Applies a policy verdict: `true` when accepted, else the refusal is sent.
    fn verdict(&mut self, verdict: Verdict, stage: &str) -> bool {
        match verdict {
            Verdict::Accept => true,
            Verdict::Reject(reason) => {
                self.reject(reason, stage);
                false
            }
            Verdict::RejectWith(reason, reply) => {
                self.reject_with(reason, reply, stage);
                false
            }
        }
    }

    /// Reads the PROXY header the load balancer sends first; the client becomes the address it
    /// names. False (after a `421`) when it is missing, malformed or late.
    async fn read_proxy_header(&mut self) -> std::io::Result<bool> {
        loop {
            match proxy::parse(&self.buf[self.start..]) {
                Ok(Some(header)) => {
                    self.start += header.len;
                    if let Some(source) = header.source {
                        debug!(balancer = %self.peer, client = %source, "PROXY header");
                        self.peer = source;
                    }
                    return Ok(true);
                }
                Ok(None) => {}
                Err(e) => {
                    info!(balancer = %self.peer, error = %e, "no valid PROXY header");
                    self.reject(RejectReason::ProxyHeader, "connect");
                    return Ok(false);
                }
            }
            match self.fill(Instant::now() + PROXY_TIMEOUT, false).await {
                Ok(Some(true)) => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    self.reject(RejectReason::ProxyHeader, "connect");
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// STARTTLS: `220`, then the handshake on the same connection. Anything the client sent
    /// after the command and before the handshake is discarded (CVE-2011-0411: commands injected
    /// in plaintext must not run inside the encrypted session).
    async fn start_tls(&mut self) -> std::io::Result<Option<End>> {
        let Some(tls) = self.ctx.tls.clone() else {
            self.reject(RejectReason::NotImplemented, "starttls");
            return Ok(self.count_error());
        };
        if self.io.tls_version().is_some() {
            self.send(&reply::BAD_SEQUENCE_TLS);
            return Ok(self.count_error());
        }
        let acceptor = tls.acceptor();
        self.send(&reply::READY_TLS);
        self.flush().await?;
        let pending = self.buf.len() - self.start;
        if pending > 0 {
            warn!(client = %self.peer.ip(), bytes = pending, "discarding plaintext sent after STARTTLS");
        }
        self.buf.clear();
        self.start = 0;
        let Io::Plain(plain) = std::mem::replace(&mut self.io, Io::Upgrading) else {
            return Ok(Some(End::Closed));
        };
        match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(plain)).await {
            Ok(Ok(stream)) => {
                self.io = Io::Tls(Box::new(stream));
                self.helo = None;
                self.tx = None;
                debug!(client = %self.peer.ip(), version = ?self.io.tls_version(),
                    cipher = ?self.io.tls_cipher(), "TLS established");
                Ok(None)
            }
            Ok(Err(e)) => {
                info!(client = %self.peer.ip(), error = %e, "TLS handshake failed");
                Ok(Some(End::Closed))
            }
            Err(_) => {
                info!(client = %self.peer.ip(), "TLS handshake timed out");
                Ok(Some(End::Closed))
            }
        }
    }

    /// Reads more input into the buffer until `deadline`: a deadline for the whole command or
    /// the whole DATA, not for each read, so a client trickling one byte a second cannot hold
    /// the session open. Returns false on EOF.
    async fn fill(
        &mut self,
        deadline: Instant,
        interruptible: bool,
    ) -> std::io::Result<Option<bool>> {
        self.flush().await?;
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let old = self.buf.len();
        self.buf.resize(old + 16 * 1024, 0);
        let (io, buf, shutdown) = (&mut self.io, &mut self.buf[old..], &self.shutdown);
        let read = tokio::time::timeout_at(deadline, io.read(buf));
        let result = if interruptible {
            tokio::select! {
                r = read => Some(r),
                _ = shutdown.cancelled() => None,
            }
        } else {
            Some(read.await)
        };
        match result {
            None => {
                self.buf.truncate(old);
                Ok(None)
            }
            Some(Err(_elapsed)) => {
                self.buf.truncate(old);
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client timed out",
                ))
            }
            Some(Ok(r)) => {
                let n = r?;
                self.buf.truncate(old + n);
                Ok(Some(n > 0))
            }
        }
    }

    /// Reads and handles one command. `Ok(None)` continues the session.
    async fn command(&mut self) -> std::io::Result<Option<End>> {
        // the whole command line must arrive within idle_timeout (RFC 5321 4.5.3.2.7: 5 min)
        let deadline = Instant::now() + self.ctx.config.smtp.idle_timeout.0;
        // find a complete line, reading as needed
        let line_end = loop {
            if self.shutdown.is_cancelled() && self.tx.is_none() {
                self.reject(RejectReason::Shutdown, "idle");
                return Ok(Some(End::Dropped));
            }
            if let Some(pos) = self.buf[self.start..].iter().position(|&b| b == b'\n') {
                break self.start + pos + 1;
            }
            if self.buf.len() - self.start > MAX_LINE {
                // drop the overlong line up to its end
                self.skip_line(deadline).await?;
                self.reject(RejectReason::LineTooLong, "command");
                return Ok(self.count_error());
            }
            match self.fill(deadline, self.tx.is_none()).await {
                Ok(Some(true)) => {}
                Ok(Some(false)) => return Ok(Some(End::Closed)),
                Ok(None) => continue, // shutdown: handled at the top
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    self.reject(RejectReason::Timeout, "command");
                    return Ok(Some(End::Dropped));
                }
                Err(e) => return Err(e),
            }
        };
        let line = self.buf[self.start..line_end].to_vec();
        self.start = line_end;
        if line.len() > MAX_LINE {
            self.reject(RejectReason::LineTooLong, "command");
            return Ok(self.count_error());
        }
        if !line.ends_with(b"\r\n") || line[..line.len() - 2].contains(&b'\r') {
            self.reject(RejectReason::BareLineEnding, "command");
            return Ok(self.count_error());
        }
        if self.shutdown.is_cancelled() && self.tx.is_none() {
            self.reject(RejectReason::Shutdown, "idle");
            return Ok(Some(End::Dropped));
        }
        let request = match Request::parse(&mut line.iter()) {
            Ok(r) => r.into_owned(),
            Err(e) => {
                debug!(client = %self.peer.ip(), error = ?e, "unparsable command");
                let reply = match e {
                    smtp_proto::Error::InvalidSenderAddress => reply::BAD_SENDER,
                    smtp_proto::Error::InvalidRecipientAddress => reply::BAD_RECIPIENT,
                    smtp_proto::Error::SyntaxError { syntax } => {
                        Reply::dynamic(501, "5.5.4", format!("Syntax: {syntax}"))
                    }
                    smtp_proto::Error::InvalidParameter { param } => {
                        Reply::dynamic(501, "5.5.4", format!("Invalid parameter {param}"))
                    }
                    smtp_proto::Error::UnsupportedParameter { param } => {
                        Reply::dynamic(555, "5.5.4", format!("Unsupported parameter {param}"))
                    }
                    _ => {
                        self.reject(RejectReason::Syntax, "command");
                        return Ok(self.count_error());
                    }
                };
                self.ctx.metrics.reject(RejectReason::Syntax);
                self.send(&reply);
                return Ok(self.count_error());
            }
        };
        self.handle(request, &line).await
    }

    fn count_error(&mut self) -> Option<End> {
        self.errors += 1;
        if self.errors >= self.ctx.config.smtp.max_errors {
            self.reject(RejectReason::TooManyErrors, "command");
            return Some(End::Dropped);
        }
        None
    }

    /// Discards input up to and including the next LF, until `deadline`.
    async fn skip_line(&mut self, deadline: Instant) -> std::io::Result<()> {
        loop {
            if let Some(pos) = self.buf[self.start..].iter().position(|&b| b == b'\n') {
                self.start += pos + 1;
                return Ok(());
            }
            self.start = self.buf.len();
            if self.fill(deadline, false).await? != Some(true) {
                return Ok(());
            }
        }
    }

    async fn handle(
        &mut self,
        request: Request<String>,
        raw: &[u8],
    ) -> std::io::Result<Option<End>> {
        match request {
            Request::Ehlo { host } => {
                self.tx = None;
                self.helo = Some(host.clone());
                let c = &self.ctx.config;
                let mut text = format!(
                    "250-{} Hello {} [{}]\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-ENHANCEDSTATUSCODES\r\n",
                    c.hostname,
                    sanitize(&host),
                    self.peer.ip(),
                    c.smtp.max_message_size.0
                );
                if self.ctx.tls.is_some() && self.io.tls_version().is_none() {
                    text.push_str("250-STARTTLS\r\n");
                }
                text.push_str("250 DSN\r\n");
                self.out.extend_from_slice(text.as_bytes());
            }
            Request::Helo { host } => {
                self.tx = None;
                self.helo = Some(host);
                let r = Reply::dynamic(250, "", self.ctx.config.hostname.clone());
                self.send(&r);
            }
            Request::Mail { from } => {
                if self.helo.is_none() {
                    self.send(&reply::NEED_HELO);
                    return Ok(self.count_error());
                }
                if self.tx.is_some() {
                    self.send(&reply::NESTED_MAIL);
                    return Ok(self.count_error());
                }
                let max = self.ctx.config.smtp.max_message_size.0 as usize;
                if from.size > max {
                    self.reject(RejectReason::Size, "mail");
                    return Ok(None);
                }
                if !self.ctx.filters.limits.message(self.peer.ip()) {
                    self.reject(RejectReason::RateLimited, "mail");
                    return Ok(None);
                }
                // refuse early when the queue cannot take even this message
                if let Err(e) = self.ctx.queue.reserve(from.size.max(1) as u64) {
                    self.queue_error(&e, "mail");
                    return Ok(None);
                }
                let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
                let Some(sender) = self.path_as_written(raw, from.address, reply::BAD_SENDER)
                else {
                    return Ok(self.count_error());
                };
                if !smtputf8 && !sender.is_ascii() {
                    self.reject(RejectReason::NonAsciiAddress, "mail");
                    return Ok(None);
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
            }
            Request::Rcpt { to } => {
                let max = self.ctx.config.smtp.max_recipients;
                let Some(tx) = self.tx.as_ref() else {
                    self.send(&reply::NEED_MAIL);
                    return Ok(self.count_error());
                };
                if tx.recipients.len() >= max {
                    self.reject(RejectReason::TooManyRecipients, "rcpt");
                    return Ok(None);
                }
                let smtputf8 = tx.smtputf8;
                let mut to = to;
                // RFC 5321 4.5.1: `RCPT TO:<postmaster>` (no domain) must be accepted; it goes
                // to the postmaster of the first configured domain (at the primary)
                // (smtp-proto gives an empty address for a path without `@`: read the line)
                if is_bare_postmaster(raw)
                    && let Some(first) = self.ctx.config.domains.first()
                {
                    to.address = format!("postmaster@{}", first.name);
                } else {
                    let Some(address) = self.path_as_written(raw, to.address, reply::BAD_RECIPIENT)
                    else {
                        return Ok(self.count_error());
                    };
                    to.address = address;
                }
                if !smtputf8 && !to.address.is_ascii() {
                    self.reject(RejectReason::NonAsciiAddress, "rcpt");
                    return Ok(None);
                }
                let relay = policy::relay::check(&self.ctx.config, &to.address, raw);
                if !self.verdict(relay, "rcpt") {
                    return Ok(self.count_error());
                }
                if !self.ctx.filters.limits.recipient(self.peer.ip()) {
                    self.reject(RejectReason::RateLimited, "rcpt");
                    return Ok(None);
                }
                if let Some(dnsbl) = &self.ctx.filters.dnsbl {
                    if self.dnsbl.is_none() {
                        self.dnsbl = Some(dnsbl.check(self.peer.ip()).await);
                    }
                    let listed = self.dnsbl.clone().expect("looked up above");
                    if !self.verdict(listed, "rcpt") {
                        return Ok(None);
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
                    return Ok(None);
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
            }
            Request::Data => {
                let Some(tx) = self.tx.as_ref() else {
                    self.send(&reply::NEED_MAIL);
                    return Ok(self.count_error());
                };
                if tx.recipients.is_empty() {
                    self.send(&reply::NO_RECIPIENTS);
                    return Ok(self.count_error());
                }
                self.send(&reply::START_DATA);
                return self.data().await;
            }
            Request::Rset => {
                self.tx = None;
                self.send(&reply::OK);
            }
            Request::Noop { .. } => self.send(&reply::OK),
            Request::Quit => {
                self.send(&reply::BYE);
                return Ok(Some(End::Closed));
            }
            Request::Vrfy { .. } => self.send(&reply::VRFY),
            Request::StartTls => return self.start_tls().await,
            Request::Help { .. } => self.send(&reply::HELP),
            _ => {
                self.reject(RejectReason::NotImplemented, "command");
                return Ok(self.count_error());
            }
        }
        Ok(None)
    }

    /// The address of a MAIL or RCPT line as the client wrote it (quoted local parts keep their
    /// quotes: see [`address`]), given what smtp-proto parsed from the same line. `None` (after
    /// `bad`, a `501`) when the two disagree: then the line is not what either reader thinks.
    fn path_as_written(&mut self, raw: &[u8], parsed: String, bad: Reply) -> Option<String> {
        if parsed.is_empty() {
            // the null reverse path `<>` (or a bare `postmaster`, handled by the caller)
            return Some(parsed);
        }
        match address::raw_path(raw) {
            Some(written) if address::dequoted(&written) == parsed => Some(written),
            written => {
                debug!(client = %self.peer.ip(), ?written, parsed, "path read two ways");
                self.ctx.metrics.reject(RejectReason::Syntax);
                self.send(&bad);
                None
            }
        }
    }

    fn queue_error(&mut self, e: &QueueError, stage: &str) {
        if e.is_full() {
            warn!(client = %self.peer.ip(), error = %e, "queue full");
            self.reject(RejectReason::QueueFull, stage);
        } else {
            warn!(client = %self.peer.ip(), error = %e, "cannot queue");
            self.reject(RejectReason::StorageError, stage);
        }
    }

    /// Receives the message after `354`, checks it and queues it.
    async fn data(&mut self) -> std::io::Result<Option<End>> {
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
        drop(held);
        self.ctx.metrics.data_inflight.set(budget.in_use() as i64);
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

/// Keeps a client-supplied name from breaking our header (no CR, LF or control bytes).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(255)
        .collect()
}

/// Finds the exact end of DATA (CRLF "." CRLF; the CRLF before the dot may be the one that
/// ended the DATA command) in raw input, across reads.
struct EndOfData {
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
    fn scan(&mut self, chunk: &[u8]) -> Option<usize> {
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

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
