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
//!
//! This file holds the session itself: the read loop, reply buffering and the refusal helpers.
//! Each larger command has its own file in `session/`, as in Stalwart's `smtp/src/inbound/`:
//! `ehlo.rs` (EHLO, HELO), `mail.rs`, `rcpt.rs`, `data.rs` (DATA, the message up to queueing)
//! and `starttls.rs`; RSET, NOOP, QUIT, VRFY and HELP are answered in `handle()`.

mod data;
mod ehlo;
mod mail;
mod rcpt;
mod starttls;

pub use data::has_bare_line_ending;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use smtp_proto::Request;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    proxy,
    tls::{Io, Tls},
};
use crate::{
    address,
    config::Config,
    metrics::Metrics,
    policy::{Filters, Verdict},
    queue::{
        Queue, QueueError,
        message::{DsnRet, Recipient},
    },
    reply::{self, RejectReason, Reply},
};
#[cfg(test)]
use data::EndOfData;

/// Longest command line accepted, CRLF included (RFC 5321 asks for at least 512).
pub const MAX_LINE: usize = 4096;
/// How long a load balancer may take to send its PROXY header.
const PROXY_TIMEOUT: Duration = Duration::from_secs(10);

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
                return Ok(self.reject_error(RejectReason::LineTooLong, "command"));
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
            return Ok(self.reject_error(RejectReason::LineTooLong, "command"));
        }
        if !line.ends_with(b"\r\n") || line[..line.len() - 2].contains(&b'\r') {
            return Ok(self.reject_error(RejectReason::BareLineEnding, "command"));
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
                    _ => return Ok(self.reject_error(RejectReason::Syntax, "command")),
                };
                self.ctx.metrics.reject(RejectReason::Syntax);
                self.send(&reply);
                return Ok(self.count_error());
            }
        };
        self.handle(request, &line).await
    }

    /// Refuses a command the client should not have sent (malformed, unknown or not offered);
    /// it counts towards `smtp.max_errors`.
    fn reject_error(&mut self, reason: RejectReason, stage: &str) -> Option<End> {
        self.reject(reason, stage);
        self.count_error()
    }

    /// Answers a command sent out of order (`503`; `554` for DATA with no recipient): not a
    /// policy refusal, so not counted as one, but an error towards `smtp.max_errors`.
    fn sequence_error(&mut self, reply: &Reply) -> Option<End> {
        self.send(reply);
        self.count_error()
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

    /// Runs one parsed command: the larger ones each have their file in `session/`.
    async fn handle(
        &mut self,
        request: Request<String>,
        raw: &[u8],
    ) -> std::io::Result<Option<End>> {
        match request {
            Request::Ehlo { host } => self.ehlo(host, true),
            Request::Helo { host } => self.ehlo(host, false),
            Request::Mail { from } => return Ok(self.mail(from, raw)),
            Request::Rcpt { to } => return Ok(self.rcpt(to, raw).await),
            Request::Data => return self.data().await,
            Request::StartTls => return self.start_tls().await,
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
            Request::Help { .. } => self.send(&reply::HELP),
            _ => return Ok(self.reject_error(RejectReason::NotImplemented, "command")),
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
}

/// Keeps a client-supplied name from breaking our header (no CR, LF or control bytes).
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(255)
        .collect()
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
