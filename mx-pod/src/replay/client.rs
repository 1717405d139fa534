//! The SMTP client replay delivers with: one connection, reused for many messages, pipelining
//! MAIL/RCPT/DATA when the server offers it, and a result for every recipient.
//!
//! Written here rather than taken from a client library because replay needs what the common
//! clients do not give: a separate outcome per recipient (accepted, `4xx`, `5xx`) from one
//! pipelined transaction, DSN parameters passed through unchanged, and `421` told apart from
//! other temporary failures (it lowers the concurrency). Replies are read line by line
//! (RFC 5321 4.2: `NNN-text` continues, `NNN text` ends), bounded in length.
//!
//! Replay believes only a real commit. Every reply is matched to its command (pipelined groups
//! included); a reply the protocol does not allow at that point (a `250` to DATA, a `3xx` to
//! RCPT), bytes the server sent when it owed no reply, an oversized or malformed reply is a
//! [`ClientError::Violation`]: the connection is dropped and nothing it said counts. A message
//! is delivered only on a `2xx` to its final dot; a failure after the dot is written is a
//! [`ClientError::UnknownOutcome`], since the server may have committed it. Waits follow RFC
//! 5321 4.5.3.2 ([`Timeouts`]).

use std::{
    pin::Pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    time::Instant,
};
use tokio_rustls::{TlsConnector, rustls::pki_types::ServerName};
use tracing::warn;

use crate::{
    queue::{
        RcptResult,
        message::{DsnRet, Envelope, Recipient},
    },
    trust::{TlsPolicy, Trust, error_chain, server_name},
};

/// Longest reply accepted from a server, all lines together.
const MAX_REPLY: usize = 64 * 1024;

/// Message data is written in blocks of this size, each within [`Timeouts::data_block`]: a
/// large message on a slow link is not one long wait.
const DATA_BLOCK: usize = 64 * 1024;

/// A step of the session: names it in errors and picks its time-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Ehlo,
    EhloAfterStartTls,
    Helo,
    StartTls,
    TlsHandshake,
    Mail,
    Rcpt,
    Data,
    /// Writing the message data.
    DataBlock,
    /// Writing the final dot and waiting for its reply: the commit.
    FinalDot,
    Rset,
    Quit,
    /// A whole health probe (`probe::probe_with`).
    Probe,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Greeting => "greeting",
            Stage::Ehlo => "EHLO",
            Stage::EhloAfterStartTls => "EHLO after STARTTLS",
            Stage::Helo => "HELO",
            Stage::StartTls => "STARTTLS",
            Stage::TlsHandshake => "TLS handshake",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::DataBlock => "the message data",
            Stage::FinalDot => "the reply to the final dot",
            Stage::Rset => "RSET",
            Stage::Quit => "QUIT",
            Stage::Probe => "the whole probe",
        })
    }
}

/// How long each wait of a session may last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, and the commands RFC 5321 sets no time for (EHLO, HELO, STARTTLS with its
    /// handshake, RSET, QUIT).
    pub command: Duration,
    pub greeting: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    /// The `354` to DATA.
    pub data: Duration,
    /// Each block of message data the server must take.
    pub data_block: Duration,
    /// The reply to the final dot. The server commits before it answers, which may take a
    /// while; giving up sooner turns a slow commit into a duplicate (RFC 5321 4.5.3.2.6).
    pub final_reply: Duration,
}

impl Timeouts {
    /// RFC 5321 4.5.3.2 for delivery: greeting, MAIL and RCPT 5 minutes, DATA 2, each data
    /// block 3; `command` for connecting and the other commands; `final_reply` for the dot (the
    /// RFC's 10 minutes by default, `replay.final_reply_timeout`).
    pub fn rfc5321(command: Duration, final_reply: Duration) -> Self {
        Timeouts {
            command,
            greeting: Duration::from_secs(5 * 60),
            mail: Duration::from_secs(5 * 60),
            rcpt: Duration::from_secs(5 * 60),
            data: Duration::from_secs(2 * 60),
            data_block: Duration::from_secs(3 * 60),
            final_reply,
        }
    }

    /// Every wait as long as `d`: probes, callouts and alerts, whose caller bounds the whole.
    pub fn uniform(d: Duration) -> Self {
        Timeouts {
            command: d,
            greeting: d,
            mail: d,
            rcpt: d,
            data: d,
            data_block: d,
            final_reply: d,
        }
    }

    /// The time-out of a wait at `stage`.
    pub fn of(&self, stage: Stage) -> Duration {
        match stage {
            Stage::Greeting => self.greeting,
            Stage::Mail => self.mail,
            Stage::Rcpt => self.rcpt,
            Stage::Data => self.data,
            Stage::DataBlock => self.data_block,
            Stage::FinalDot => self.final_reply,
            Stage::Ehlo
            | Stage::EhloAfterStartTls
            | Stage::Helo
            | Stage::StartTls
            | Stage::TlsHandshake
            | Stage::Rset
            | Stage::Quit
            | Stage::Probe => self.command,
        }
    }
}

impl From<Duration> for Timeouts {
    fn from(d: Duration) -> Self {
        Timeouts::uniform(d)
    }
}

/// How a server broke the protocol. After any of these the session is out of step (a reply
/// may belong to another command): it is dropped and nothing it said about the message counts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A reply the command does not allow: anything but `354` or a refusal to DATA (a `250`
    /// there is no delivery), a `3xx` to EHLO, MAIL, RCPT or the final dot, an acceptance of
    /// a pipelined RCPT or DATA after MAIL was refused.
    #[error("unexpected reply {0}")]
    UnexpectedReply(ServerReply),
    /// Bytes the server sent when it owed no reply (before a command, after the last reply).
    #[error("unsolicited data {0:?}")]
    Unsolicited(String),
    /// Bytes after the `220` to STARTTLS, before the handshake (RFC 3207 5, CVE-2011-0411).
    #[error("data after the 220 reply to STARTTLS {0:?} (refused: plaintext injection)")]
    PlaintextInjection(String),
    #[error("reply longer than {MAX_REPLY} bytes")]
    TooLong,
    /// A line that is not `NNN`, `NNN text` or `NNN-text` with a code from 200 to 599.
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("one reply with two codes, {first} then {then}")]
    MixedCodes { first: u16, then: u16 },
}

/// A reply from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReply {
    pub code: u16,
    /// Every line's text after the code and separator.
    pub lines: Vec<String>,
}

impl ServerReply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// One line for logs and DSNs: `code text`.
    pub fn text(&self) -> String {
        format!("{} {}", self.code, self.lines.join(" / "))
    }
}

impl std::fmt::Display for ServerReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

/// A failure of the connection or the session as a whole (not of one recipient).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {error}")]
    Connect { addr: String, error: String },
    #[error("timed out after {after:?} waiting for {stage}")]
    Timeout { stage: Stage, after: Duration },
    #[error("connection closed while waiting for {0}")]
    Closed(Stage),
    /// The server said `421` (it is closing) when no reply was due, before `stage`.
    #[error("server closed the connection before {stage}: {reply}")]
    Dropped { stage: Stage, reply: ServerReply },
    #[error("{stage} refused: {reply}")]
    Refused { stage: Stage, reply: ServerReply },
    /// The server broke the protocol at `stage`: the connection is dropped.
    #[error("protocol error at {stage}: {violation}")]
    Violation { stage: Stage, violation: Violation },
    /// Failed after the final dot was written, before a trustworthy reply: the server may have
    /// committed the message or not. Delivering it again may make a duplicate.
    #[error("connection lost after the final dot ({0}); the server may have committed the message")]
    UnknownOutcome(Box<ClientError>),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("I/O error: {0}")]
    Io(String),
    /// The message was withdrawn before its final dot (its commit turn said so): the
    /// connection is closed, so the server discards the unfinished message.
    #[error("withdrawn before commit: an older message of the route failed first")]
    Withdrawn,
    /// TLS could not be used with the server (and the policy does not allow plaintext, or the
    /// failure came after STARTTLS began).
    #[error("TLS {}: {detail}", failure.describe())]
    Tls { failure: TlsFailure, detail: String },
}

impl ClientError {
    /// True for a `421` from the server: it wants fewer connections.
    pub fn is_throttle(&self) -> bool {
        matches!(self, ClientError::Refused { reply, .. } if reply.code == 421)
    }

    /// True when the server may have committed the message (see [`ClientError::UnknownOutcome`]).
    pub fn is_unknown_outcome(&self) -> bool {
        matches!(self, ClientError::UnknownOutcome(_))
    }

    /// True when the connection turned out gone before the final dot: closed, reset, or a
    /// `421` the server sent while idle. Nothing was committed; a new connection may try at once.
    pub fn is_stale_connection(&self) -> bool {
        matches!(
            self,
            ClientError::Closed(_) | ClientError::Dropped { .. } | ClientError::Io(_)
        )
    }

    /// The TLS failure, when this is one.
    pub fn tls_failure(&self) -> Option<TlsFailure> {
        match self {
            ClientError::Tls { failure, .. } => Some(*failure),
            _ => None,
        }
    }
}

/// Why TLS could not be used with a server (the `reason` label of `mxpod_tls_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// The EHLO reply has no `STARTTLS`.
    NotOffered,
    /// `STARTTLS` was answered with something other than `220`.
    Refused,
    /// The TLS handshake failed (protocol, cipher, signature).
    Handshake,
    /// The certificate did not verify (policy `verify`: chain or host name).
    Certificate,
}

impl TlsFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsFailure::NotOffered => "not_offered",
            TlsFailure::Refused => "refused",
            TlsFailure::Handshake => "handshake",
            TlsFailure::Certificate => "certificate",
        }
    }

    /// Words for errors: "TLS {this}: detail".
    pub fn describe(self) -> &'static str {
        match self {
            TlsFailure::NotOffered => "not offered",
            TlsFailure::Refused => "refused",
            TlsFailure::Handshake => "handshake failed",
            TlsFailure::Certificate => "certificate rejected",
        }
    }

    pub const ALL: [TlsFailure; 4] = [
        TlsFailure::NotOffered,
        TlsFailure::Refused,
        TlsFailure::Handshake,
        TlsFailure::Certificate,
    ];
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub esmtp: bool,
    pub pipelining: bool,
    pub dsn: bool,
    pub smtputf8: bool,
    pub eight_bit_mime: bool,
    pub size: Option<u64>,
    pub starttls: bool,
    /// Every keyword offered, upper case.
    pub keywords: Vec<String>,
}

impl Capabilities {
    fn parse(reply: &ServerReply) -> Self {
        let mut c = Capabilities {
            esmtp: true,
            ..Default::default()
        };
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(kw) = words.next() else { continue };
            let kw = kw.to_ascii_uppercase();
            match kw.as_str() {
                "PIPELINING" => c.pipelining = true,
                "DSN" => c.dsn = true,
                "SMTPUTF8" => c.smtputf8 = true,
                "8BITMIME" => c.eight_bit_mime = true,
                "STARTTLS" => c.starttls = true,
                "SIZE" => c.size = words.next().and_then(|n| n.parse().ok()),
                _ => {}
            }
            c.keywords.push(kw);
        }
        c
    }
}

/// The results of one transaction.
#[derive(Debug, Default)]
pub struct TxResult {
    /// One entry per recipient given, by its index in the envelope.
    pub results: Vec<(usize, RcptResult)>,
    /// The server said `421` somewhere: it closed the connection and wants fewer of them.
    pub throttled: bool,
}

/// When a transaction may end. The final dot of the data is what commits a message at the
/// server, so whoever sends through [`SmtpClient::send`] decides when it is written.
pub trait CommitTurn {
    /// Whether the message may be committed at once.
    fn ready(&self) -> bool;
    /// Waits until it may be committed; `false`: withdraw it instead.
    fn wait(&self) -> impl Future<Output = bool> + Send;
}

/// No ordering: every message is committed as soon as its data is written (DSNs).
pub struct AtOnce;

impl CommitTurn for AtOnce {
    fn ready(&self) -> bool {
        true
    }
    async fn wait(&self) -> bool {
        true
    }
}

/// What an [`SmtpClient`] talks over: a TCP connection, or TLS on it after `STARTTLS`.
trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for T {}

/// An open SMTP client session.
pub struct SmtpClient {
    stream: Box<dyn ClientIo>,
    buf: Vec<u8>,
    start: usize,
    timeouts: Timeouts,
    pub greeting: ServerReply,
    pub caps: Capabilities,
    /// Transactions sent over this connection.
    pub sent: usize,
    /// The negotiated TLS protocol and cipher (`TLSv1_3 TLS13_AES_256_GCM_SHA384`), when the
    /// session runs over TLS.
    pub tls: Option<String>,
    /// Under policy `may`: the TLS failure this plaintext session fell back from.
    pub tls_fallback: Option<TlsFailure>,
    broken: bool,
}

impl SmtpClient {
    /// Connects, reads the `220` greeting and says EHLO (HELO when EHLO is refused).
    /// `timeouts`: a `Duration` makes every wait that long.
    pub async fn connect(
        addr: &str,
        helo: &str,
        timeouts: impl Into<Timeouts>,
    ) -> Result<Self, ClientError> {
        let timeouts = timeouts.into();
        let stream = tokio::time::timeout(timeouts.command, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_owned(),
                error: format!("no answer within {:?}", timeouts.command),
            })?
            .map_err(|e| ClientError::Connect {
                addr: addr.to_owned(),
                error: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        Self::start(Box::new(stream), helo, timeouts).await
    }

    /// Reads the greeting on an open stream and says EHLO.
    async fn start(
        stream: Box<dyn ClientIo>,
        helo: &str,
        timeouts: Timeouts,
    ) -> Result<Self, ClientError> {
        let mut c = SmtpClient::over(stream, timeouts);
        let greeting = c.read_reply(Stage::Greeting).await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused {
                stage: Stage::Greeting,
                reply: greeting,
            });
        }
        c.greeting = greeting;
        c.hello(helo, Stage::Ehlo).await?;
        Ok(c)
    }

    /// A session on an open stream, before its greeting (or its TLS session) is read.
    fn over(stream: Box<dyn ClientIo>, timeouts: Timeouts) -> Self {
        SmtpClient {
            stream,
            buf: Vec::with_capacity(4096),
            start: 0,
            timeouts,
            greeting: ServerReply {
                code: 0,
                lines: vec![],
            },
            caps: Capabilities::default(),
            sent: 0,
            tls: None,
            tls_fallback: None,
            broken: false,
        }
    }

    /// Connects as [`SmtpClient::connect`] does, then applies the TLS `policy` (RFC 3207,
    /// Postfix's `smtp_tls_security_level`): `none` stays in plaintext; `may` says STARTTLS
    /// when offered and, if STARTTLS or the handshake fails, delivers in plaintext on a new
    /// connection (`tls_fallback` says why); `encrypt` and `verify` fail with
    /// [`ClientError::Tls`] instead, so nothing is ever sent in plaintext under them. `verify`
    /// checks the chain against `trust` and the certificate against the host of `addr`.
    pub async fn open(
        addr: &str,
        helo: &str,
        timeouts: impl Into<Timeouts>,
        policy: TlsPolicy,
        trust: &Trust,
    ) -> Result<Self, ClientError> {
        let timeouts = timeouts.into();
        let client = Self::connect(addr, helo, timeouts).await?;
        if policy == TlsPolicy::None {
            return Ok(client);
        }
        if !client.caps.starttls {
            if policy.allows_plaintext() {
                return Ok(client);
            }
            client.quit().await;
            return Err(ClientError::Tls {
                failure: TlsFailure::NotOffered,
                detail: format!(
                    "{addr} does not offer STARTTLS, and tls policy {policy} allows no plaintext"
                ),
            });
        }
        let name = server_name(addr).map_err(|e| ClientError::Protocol(e.0))?;
        match client
            .starttls(&trust.smtp_connector(policy), name, helo)
            .await
        {
            Ok((mut c, negotiated)) => {
                c.tls = Some(negotiated);
                Ok(c)
            }
            Err(ClientError::Tls { failure, detail }) if policy.allows_plaintext() => {
                warn!(server = %addr, failure = failure.as_str(), error = %detail,
                    "STARTTLS failed; delivering in plaintext on a new connection (tls policy may)");
                let mut c = Self::connect(addr, helo, timeouts).await?;
                c.tls_fallback = Some(failure);
                Ok(c)
            }
            Err(e) => Err(e),
        }
    }

    /// Says EHLO (HELO when EHLO is refused) and keeps the capabilities; `stage` names the
    /// EHLO in errors.
    async fn hello(&mut self, helo: &str, stage: Stage) -> Result<(), ClientError> {
        let ehlo = self.command(&format!("EHLO {helo}\r\n"), stage).await?;
        match ehlo.code {
            250 => self.caps = Capabilities::parse(&ehlo),
            421 => return Err(ClientError::Refused { stage, reply: ehlo }),
            400..=599 => {
                let helo_reply = self
                    .command(&format!("HELO {helo}\r\n"), Stage::Helo)
                    .await?;
                if helo_reply.code != 250 {
                    return Err(ClientError::Refused {
                        stage: Stage::Helo,
                        reply: helo_reply,
                    });
                }
            }
            _ => return Err(self.violation(stage, Violation::UnexpectedReply(ehlo))),
        }
        Ok(())
    }

    /// `STARTTLS` (RFC 3207): after its `220`, the TLS handshake through `connector` for
    /// `name`, then EHLO again inside TLS. Returns the session over TLS (the capabilities
    /// replaced by the new EHLO's) and the negotiated "protocol cipher". Bytes the server sent
    /// after the `220` (before the handshake) are an injection attempt: refused.
    pub async fn starttls(
        mut self,
        connector: &TlsConnector,
        name: ServerName<'static>,
        helo: &str,
    ) -> Result<(SmtpClient, String), ClientError> {
        let reply = self.command("STARTTLS\r\n", Stage::StartTls).await?;
        if reply.code != 220 {
            self.quit().await;
            return Err(ClientError::Tls {
                failure: TlsFailure::Refused,
                detail: format!("STARTTLS answered {reply}"),
            });
        }
        // plaintext the server sent after its 220 would be taken as said inside TLS; a hang-up
        // is left to fail the handshake (a TLS failure, which policy `may` falls back from)
        match self.expect_quiet(Stage::TlsHandshake) {
            Err(ClientError::Closed(_) | ClientError::Io(_)) | Ok(()) => {}
            Err(ClientError::Violation {
                stage,
                violation: Violation::Unsolicited(line),
            }) => {
                return Err(ClientError::Violation {
                    stage,
                    violation: Violation::PlaintextInjection(line),
                });
            }
            Err(e) => return Err(e),
        }
        let handshake =
            tokio::time::timeout(self.timeouts.command, connector.connect(name, self.stream));
        let tls = handshake
            .await
            .map_err(|_| ClientError::Timeout {
                stage: Stage::TlsHandshake,
                after: self.timeouts.command,
            })?
            .map_err(|e| {
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| {
                        matches!(
                            r,
                            rustls::Error::InvalidCertificate(_)
                                | rustls::Error::NoCertificatesPresented
                        )
                    });
                ClientError::Tls {
                    failure: if certificate {
                        TlsFailure::Certificate
                    } else {
                        TlsFailure::Handshake
                    },
                    detail: error_chain(&e),
                }
            })?;
        let (_, conn) = tls.get_ref();
        let negotiated = format!(
            "{:?} {:?}",
            conn.protocol_version()
                .ok_or_else(|| ClientError::Protocol("TLS: no protocol version".into()))?,
            conn.negotiated_cipher_suite()
                .ok_or_else(|| ClientError::Protocol("TLS: no cipher suite".into()))?
                .suite()
        );
        let mut c = SmtpClient::over(Box::new(tls), self.timeouts);
        c.greeting = self.greeting;
        c.hello(helo, Stage::EhloAfterStartTls).await?;
        Ok((c, negotiated))
    }

    /// False once the connection can no longer be used for another transaction.
    pub fn usable(&self) -> bool {
        !self.broken
    }

    /// Says QUIT and closes, without waiting long.
    pub async fn quit(mut self) {
        if !self.broken {
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                let _ = self.command("QUIT\r\n", Stage::Quit).await;
            })
            .await;
        }
        let _ = self.stream.shutdown().await;
    }

    /// Marks the session out of step and makes the error.
    fn violation(&mut self, stage: Stage, violation: Violation) -> ClientError {
        self.broken = true;
        ClientError::Violation { stage, violation }
    }

    /// Writes all of `bytes` (and flushes them out of a TLS session) within the time-out of
    /// `stage`.
    async fn write(&mut self, bytes: &[u8], stage: Stage) -> Result<(), ClientError> {
        let after = self.timeouts.of(stage);
        let r = tokio::time::timeout(after, async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
        .await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(ClientError::Io(e.to_string()))
            }
            Err(_) => {
                self.broken = true;
                Err(ClientError::Timeout { stage, after })
            }
        }
    }

    /// Before `stage` is sent, the server owes no reply: anything it has sent by now is out of
    /// step (a second reply to one command, a line after a reply), and an end of stream means it
    /// hung up. Looks only at what has already arrived; never waits.
    fn expect_quiet(&mut self, stage: Stage) -> Result<(), ClientError> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            let mut cx = Context::from_waker(Waker::noop());
            match Pin::new(&mut self.stream).poll_read(&mut cx, &mut read) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Err(e)) => {
                    self.broken = true;
                    return Err(ClientError::Io(e.to_string()));
                }
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    self.broken = true;
                    return Err(ClientError::Closed(stage));
                }
                Poll::Ready(Ok(())) => self.buf.extend_from_slice(read.filled()),
            }
        }
        let pending = &self.buf[self.start..];
        let first = pending.split(|&b| b == b'\n').next().unwrap_or_default();
        let first = String::from_utf8_lossy(first.strip_suffix(b"\r").unwrap_or(first));
        let first: String = first.chars().take(200).collect();
        self.broken = true;
        if first.starts_with("421") {
            // a server timing out or shutting down says 421 and closes (RFC 5321 3.8)
            return Err(ClientError::Dropped {
                stage,
                reply: ServerReply {
                    code: 421,
                    lines: vec![first.get(4..).unwrap_or("").to_owned()],
                },
            });
        }
        Err(self.violation(stage, Violation::Unsolicited(first)))
    }

    /// Sends one command and reads its reply (checking first that no other reply is pending).
    pub async fn command(&mut self, line: &str, stage: Stage) -> Result<ServerReply, ClientError> {
        self.expect_quiet(stage)?;
        self.write(line.as_bytes(), stage).await?;
        self.read_reply(stage).await
    }

    /// Reads one (possibly multi-line) reply, whole within the time-out of `stage`.
    pub async fn read_reply(&mut self, stage: Stage) -> Result<ServerReply, ClientError> {
        let deadline = Instant::now() + self.timeouts.of(stage);
        let mut lines = Vec::new();
        let mut code = 0u16;
        let mut total = 0usize;
        loop {
            let Some(nl) = self.buf[self.start..].iter().position(|&b| b == b'\n') else {
                if total + self.buf.len() - self.start > MAX_REPLY {
                    return Err(self.violation(stage, Violation::TooLong));
                }
                self.fill(stage, deadline).await?;
                continue;
            };
            let raw = &self.buf[self.start..self.start + nl];
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            total += raw.len() + 2;
            if total > MAX_REPLY {
                return Err(self.violation(stage, Violation::TooLong));
            }
            let parsed = parse_line(raw);
            self.start += nl + 1;
            let (this, more, text) = match parsed {
                Ok(p) => p,
                Err(v) => return Err(self.violation(stage, v)),
            };
            if code != 0 && this != code {
                return Err(self.violation(
                    stage,
                    Violation::MixedCodes {
                        first: code,
                        then: this,
                    },
                ));
            }
            code = this;
            lines.push(text);
            if !more {
                if code == 421 {
                    // the server closes after 421
                    self.broken = true;
                }
                return Ok(ServerReply { code, lines });
            }
        }
    }

    async fn fill(&mut self, stage: Stage, deadline: Instant) -> Result<(), ClientError> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let mut chunk = [0u8; 8192];
        let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
            Err(_) => {
                self.broken = true;
                return Err(ClientError::Timeout {
                    stage,
                    after: self.timeouts.of(stage),
                });
            }
            Ok(Err(e)) => {
                self.broken = true;
                return Err(ClientError::Io(e.to_string()));
            }
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            self.broken = true;
            return Err(ClientError::Closed(stage));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Sends one message to `recipients` (index into the envelope, recipient), pipelined when
    /// offered, and writes its final dot when `turn` allows. `Ok` holds what the server said
    /// about each recipient: `Delivered` only from a `2xx` to the final dot. `Err` means
    /// nothing is known about any recipient (connection-level failure, protocol violation, the
    /// message withdrawn); [`ClientError::UnknownOutcome`] when that happened after the dot.
    ///
    /// A message that needs SMTPUTF8 ([`smtputf8_refusals`]) is never sent to a server that does
    /// not offer it, neither downgraded nor mangled: the recipients that need it fail with
    /// `553 5.6.7` (the sender gets a DSN saying why), the others are delivered as usual.
    pub async fn send(
        &mut self,
        env: &Envelope,
        recipients: &[(usize, &Recipient)],
        body: &[u8],
        turn: &impl CommitTurn,
    ) -> Result<TxResult, ClientError> {
        let refused = smtputf8_refusals(env, recipients, body, self.caps.smtputf8);
        if refused.is_empty() {
            return self.transact(env, recipients, body, turn).await;
        }
        let rest: Vec<(usize, &Recipient)> = recipients
            .iter()
            .filter(|(i, _)| !refused.contains(i))
            .copied()
            .collect();
        let mut out = if rest.is_empty() {
            TxResult::default()
        } else {
            self.transact(env, &rest, body, turn).await?
        };
        let reply = format!("553 5.6.7 {UTF8_NOT_OFFERED_TEXT}");
        out.results.extend(
            refused
                .into_iter()
                .map(|i| (i, RcptResult::Failed(reply.clone()))),
        );
        Ok(out)
    }

    /// One transaction for `recipients`: see [`SmtpClient::send`].
    async fn transact(
        &mut self,
        env: &Envelope,
        recipients: &[(usize, &Recipient)],
        body: &[u8],
        turn: &impl CommitTurn,
    ) -> Result<TxResult, ClientError> {
        let mail = self.mail_command(env, body.len());
        let rcpts: Vec<String> = recipients
            .iter()
            .map(|(_, r)| self.rcpt_command(r))
            .collect();
        let mut out = TxResult::default();
        self.sent += 1;

        // a reused connection: the server hung up, or sent something, since the last reply
        self.expect_quiet(Stage::Mail)?;
        let pipelined = self.caps.pipelining;
        if pipelined {
            let mut batch = mail.clone();
            for r in &rcpts {
                batch.push_str(r);
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes(), Stage::Mail).await?;
        } else {
            self.write(mail.as_bytes(), Stage::Mail).await?;
        }

        let mail_reply = self.read_reply(Stage::Mail).await?;
        match Class::of(&mail_reply) {
            Class::Positive => {}
            Class::Intermediate => {
                return Err(self.violation(Stage::Mail, Violation::UnexpectedReply(mail_reply)));
            }
            Class::Refusal => {
                if pipelined {
                    // the pipelined RCPTs and DATA are answered too, each with a refusal: a
                    // server that accepts them without a sender is out of step
                    for stage in std::iter::repeat_n(Stage::Rcpt, rcpts.len()).chain([Stage::Data])
                    {
                        if self.broken {
                            break;
                        }
                        let reply = self.read_reply(stage).await?;
                        if Class::of(&reply) != Class::Refusal {
                            return Err(self.violation(stage, Violation::UnexpectedReply(reply)));
                        }
                    }
                }
                if mail_reply.code == 421 {
                    return Err(ClientError::Refused {
                        stage: Stage::Mail,
                        reply: mail_reply,
                    });
                }
                self.reset().await;
                let result = classify(&mail_reply);
                out.results = recipients
                    .iter()
                    .map(|(i, _)| (*i, result.clone()))
                    .collect();
                return Ok(out);
            }
        }

        let mut accepted = Vec::new();
        for (k, (i, _)) in recipients.iter().enumerate() {
            if !pipelined {
                let line = rcpts[k].clone();
                self.expect_quiet(Stage::Rcpt)?;
                self.write(line.as_bytes(), Stage::Rcpt).await?;
            }
            let reply = self.read_reply(Stage::Rcpt).await?;
            match Class::of(&reply) {
                Class::Positive => accepted.push(*i),
                Class::Intermediate => {
                    return Err(self.violation(Stage::Rcpt, Violation::UnexpectedReply(reply)));
                }
                Class::Refusal => {
                    out.throttled |= reply.code == 421;
                    out.results.push((*i, classify(&reply)));
                }
            }
            if self.broken {
                // 421: the rest is unknown; leave those recipients untouched
                return if accepted.is_empty() && out.results.is_empty() {
                    Err(ClientError::Refused {
                        stage: Stage::Rcpt,
                        reply,
                    })
                } else {
                    out.results.extend(
                        accepted
                            .iter()
                            .chain(recipients[k + 1..].iter().map(|(i, _)| i))
                            .map(|i| (*i, RcptResult::Deferred(reply.text()))),
                    );
                    out.throttled = true;
                    Ok(out)
                };
            }
        }

        let data_reply = if pipelined {
            self.read_reply(Stage::Data).await?
        } else if accepted.is_empty() {
            self.reset().await;
            return Ok(out);
        } else {
            self.command("DATA\r\n", Stage::Data).await?
        };
        match (Class::of(&data_reply), data_reply.code) {
            (Class::Refusal, _) => {
                out.throttled |= data_reply.code == 421;
                if !accepted.is_empty() {
                    let r = classify(&data_reply);
                    out.results.extend(accepted.iter().map(|i| (*i, r.clone())));
                }
                self.reset().await;
                return Ok(out);
            }
            (_, 354) => {}
            _ => return Err(self.violation(Stage::Data, Violation::UnexpectedReply(data_reply))),
        }
        if accepted.is_empty() {
            // RFC 2920 3.1: a server may say 354 to a pipelined DATA with no recipient left;
            // the client then sends a lone dot, which commits nothing
            self.expect_quiet(Stage::DataBlock)?;
            self.write(b".\r\n", Stage::DataBlock).await?;
            let reply = self.read_reply(Stage::FinalDot).await?;
            if Class::of(&reply) == Class::Intermediate {
                return Err(self.violation(Stage::FinalDot, Violation::UnexpectedReply(reply)));
            }
            self.reset().await;
            return Ok(out);
        }

        // a second reply to DATA, or anything after the 354, would be read as the dot's reply
        self.expect_quiet(Stage::DataBlock)?;
        let mut data = dot_stuff(body);
        if turn.ready() {
            data.extend_from_slice(b".\r\n");
            self.write_data(&data).await?;
        } else {
            // everything but the dot now, the dot in turn: the wait costs no transfer time
            self.write_data(&data).await?;
            if !turn.wait().await {
                // SMTP has no way to cancel DATA: a connection closed before the dot is a
                // message the server discards (RFC 5321 4.1.1.4)
                self.broken = true;
                return Err(ClientError::Withdrawn);
            }
            // the wait may have been long: a server that gave up on us said so by now
            self.expect_quiet(Stage::DataBlock)?;
            self.write(b".\r\n", Stage::DataBlock).await?;
        }
        // the dot is out: from here on the server may have committed the message
        let unknown = |e| ClientError::UnknownOutcome(Box::new(e));
        let final_reply = self.read_reply(Stage::FinalDot).await.map_err(unknown)?;
        if Class::of(&final_reply) == Class::Intermediate {
            let v = Violation::UnexpectedReply(final_reply);
            return Err(unknown(self.violation(Stage::FinalDot, v)));
        }
        // a reply after the last one due: this session's replies cannot be matched to its
        // commands, so neither can the one to the dot. A 421 or a hang-up only ends the session.
        if let Err(e @ ClientError::Violation { .. }) = self.expect_quiet(Stage::FinalDot) {
            return Err(unknown(e));
        }
        out.throttled |= final_reply.code == 421;
        let r = classify(&final_reply);
        out.results.extend(accepted.iter().map(|i| (*i, r.clone())));
        Ok(out)
    }

    /// Writes message data in blocks, each within [`Timeouts::data_block`].
    async fn write_data(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for block in data.chunks(DATA_BLOCK) {
            self.write(block, Stage::DataBlock).await?;
        }
        Ok(())
    }

    /// RSET after a refused transaction; anything but `250` leaves the connection unusable.
    async fn reset(&mut self) {
        if self.broken {
            return;
        }
        match self.command("RSET\r\n", Stage::Rset).await {
            Ok(r) if r.code == 250 => {}
            _ => self.broken = true,
        }
    }
    fn mail_command(&self, env: &Envelope, size: usize) -> String {
        let mut s = format!("MAIL FROM:<{}>", env.sender);
        if self.caps.size.is_some() {
            s.push_str(&format!(" SIZE={size}"));
        }
        if env.eight_bit && self.caps.eight_bit_mime {
            s.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 && self.caps.smtputf8 {
            s.push_str(" SMTPUTF8");
        }
        if self.caps.dsn {
            match env.ret {
                Some(DsnRet::Full) => s.push_str(" RET=FULL"),
                Some(DsnRet::Hdrs) => s.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(id) = &env.env_id {
                s.push_str(&format!(" ENVID={}", xtext(id)));
            }
        }
        s.push_str("\r\n");
        s
    }

    fn rcpt_command(&self, r: &Recipient) -> String {
        rcpt_line(&self.caps, r)
    }
}

/// Why a recipient that needs SMTPUTF8 fails at a server that does not offer it (after
/// `553 5.6.7`, RFC 6531 3.7.4.1 / RFC 3463 "non-ASCII addresses not permitted").
pub const UTF8_NOT_OFFERED_TEXT: &str = "primary does not support SMTPUTF8";

/// The recipients (by envelope index) that cannot be sent to a server offering SMTPUTF8 or not
/// (`offered`): none when it is offered or the client did not ask for it; else every recipient
/// when the sender or a header has UTF-8 in it (RFC 6531/6532: the whole message needs it), and
/// otherwise those whose own address has. A message marked SMTPUTF8 that needs none of it (all
/// ASCII) is sent as it is: nothing is downgraded.
pub fn smtputf8_refusals(
    env: &Envelope,
    recipients: &[(usize, &Recipient)],
    body: &[u8],
    offered: bool,
) -> Vec<usize> {
    if offered || !env.smtputf8 {
        return Vec::new();
    }
    let headers_end = body
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(body.len());
    let whole = !env.sender.is_ascii() || !body[..headers_end].is_ascii();
    recipients
        .iter()
        .filter(|(_, r)| whole || !r.address.is_ascii())
        .map(|(i, _)| *i)
        .collect()
}

/// `RCPT TO:<address>` with the DSN parameters when the server offers DSN.
fn rcpt_line(caps: &Capabilities, r: &Recipient) -> String {
    let mut s = format!("RCPT TO:<{}>", r.address);
    if caps.dsn {
        let n = &r.notify;
        if n.explicit {
            let mut v = Vec::new();
            if n.never {
                v.push("NEVER");
            } else {
                if n.success {
                    v.push("SUCCESS");
                }
                if n.failure {
                    v.push("FAILURE");
                }
                if n.delay {
                    v.push("DELAY");
                }
            }
            s.push_str(&format!(" NOTIFY={}", v.join(",")));
        }
        // stored decoded (smtp-proto accepts only the rfc822 type): sent as RFC 3461
        // `ORCPT=rfc822;xtext`
        if let Some(o) = &r.orcpt {
            s.push_str(&format!(" ORCPT=rfc822;{}", xtext(orcpt_address(o))));
        }
    }
    s.push_str("\r\n");
    s
}

/// What a reply code says, for matching the reply to its command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// `2xx`.
    Positive,
    /// `3xx`: only `354`, and only to DATA, is one the client can be owed.
    Intermediate,
    /// `4xx` or `5xx`.
    Refusal,
}

impl Class {
    fn of(reply: &ServerReply) -> Self {
        match reply.code / 100 {
            2 => Class::Positive,
            3 => Class::Intermediate,
            _ => Class::Refusal,
        }
    }
}

/// One reply line without its line end (RFC 5321 4.2): a code from 200 to 599, then nothing,
/// a space or a `-` (more lines follow), then text without control characters. Returns the
/// code, whether more lines follow, and the text.
fn parse_line(raw: &[u8]) -> Result<(u16, bool, String), Violation> {
    let malformed =
        || Violation::Malformed(String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned());
    let code = match raw.get(..3) {
        Some(d) if d.iter().all(u8::is_ascii_digit) && (b'2'..=b'5').contains(&d[0]) => {
            d.iter().fold(0u16, |n, b| n * 10 + u16::from(b - b'0'))
        }
        _ => return Err(malformed()),
    };
    let more = match raw.get(3) {
        None | Some(b' ') => false,
        Some(b'-') => true,
        Some(_) => return Err(malformed()),
    };
    let text = raw.get(4..).unwrap_or_default();
    if text.iter().any(|&b| (b < 32 && b != b'\t') || b == 127) {
        return Err(malformed());
    }
    Ok((code, more, String::from_utf8_lossy(text).into_owned()))
}

/// Maps a reply to a recipient result: 2xx delivered, 4xx retried, 5xx failed.
fn classify(reply: &ServerReply) -> RcptResult {
    if reply.is_positive() {
        RcptResult::Delivered(reply.text())
    } else if reply.is_transient() {
        RcptResult::Deferred(reply.text())
    } else {
        RcptResult::Failed(reply.text())
    }
}

/// RFC 5321 4.5.2: a line starting with `.` gets another; the message ends with CRLF.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// RFC 3461 xtext encoding for ENVID.
/// The address of a stored ORCPT value (decoded; a leading `rfc822;` is dropped if present).
pub fn orcpt_address(stored: &str) -> &str {
    match stored.split_once(';') {
        Some((t, a)) if t.trim().eq_ignore_ascii_case("rfc822") => a.trim(),
        _ => stored,
    }
}

fn xtext(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n.\r\n"), b"..a\r\nb\r\n..\r\n");
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n");
    }

    #[test]
    fn capabilities_from_ehlo() {
        let r = ServerReply {
            code: 250,
            lines: vec![
                "mx Hello".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "dsn".into(),
                "STARTTLS".into(),
            ],
        };
        let c = Capabilities::parse(&r);
        assert!(c.pipelining && c.dsn && c.starttls && !c.smtputf8);
        assert_eq!(c.size, Some(1000));
    }

    #[test]
    fn classification() {
        let r = |code| ServerReply {
            code,
            lines: vec!["x".into()],
        };
        assert!(matches!(classify(&r(250)), RcptResult::Delivered(_)));
        assert!(matches!(classify(&r(451)), RcptResult::Deferred(_)));
        assert!(matches!(classify(&r(550)), RcptResult::Failed(_)));
    }

    #[test]
    fn orcpt_is_sent_with_its_address_type_and_xtext() {
        use crate::queue::message::Notify;
        let notify = Notify {
            failure: true,
            explicit: true,
            ..Notify::default()
        };
        let r = Recipient::new(
            "bob@example.test".into(),
            Some("Bob+Tax=1@Example.test".into()),
            notify,
        );
        let dsn = Capabilities {
            dsn: true,
            ..Capabilities::default()
        };
        assert_eq!(
            rcpt_line(&dsn, &r),
            "RCPT TO:<bob@example.test> NOTIFY=FAILURE ORCPT=rfc822;Bob+2BTax+3D1@Example.test\r\n"
        );
        // without DSN at the primary: no parameters
        assert_eq!(
            rcpt_line(&Capabilities::default(), &r),
            "RCPT TO:<bob@example.test>\r\n"
        );
        assert_eq!(orcpt_address("rfc822; a@b.test"), "a@b.test");
        assert_eq!(orcpt_address("a@b.test"), "a@b.test");
    }

    /// A server offering STARTTLS whose TLS is broken: it says `220` and hangs up. Serves any
    /// number of connections; returns its address and how many it has taken.
    async fn broken_tls_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncBufReadExt, BufReader};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut r = BufReader::new(s);
                    r.get_mut()
                        .write_all(b"220 p.test ESMTP\r\n")
                        .await
                        .unwrap();
                    let mut line = String::new();
                    while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                        let reply: &[u8] = if line.starts_with("EHLO") {
                            b"250-p.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
                        } else if line.starts_with("STARTTLS") {
                            let _ = r.get_mut().write_all(b"220 2.0.0 go ahead\r\n").await;
                            return;
                        } else {
                            b"221 bye\r\n"
                        };
                        let _ = r.get_mut().write_all(reply).await;
                        line.clear();
                    }
                });
            }
        });
        (addr, count)
    }

    #[tokio::test]
    async fn may_falls_back_to_plaintext_on_a_new_connection_and_encrypt_does_not() {
        use std::sync::atomic::Ordering;
        let trust = Trust::webpki();
        let t = Duration::from_secs(5);
        let (addr, conns) = broken_tls_server().await;
        let c = SmtpClient::open(&addr, "mx2.test", t, TlsPolicy::May, &trust)
            .await
            .expect("may delivers without TLS");
        assert!(c.tls.is_none());
        assert_eq!(c.tls_fallback, Some(TlsFailure::Handshake));
        assert_eq!(
            conns.load(Ordering::SeqCst),
            2,
            "a new connection for plaintext"
        );
        c.quit().await;

        for policy in [TlsPolicy::Encrypt, TlsPolicy::Verify] {
            let before = conns.load(Ordering::SeqCst);
            let err = SmtpClient::open(&addr, "mx2.test", t, policy, &trust)
                .await
                .err()
                .expect("no plaintext under encrypt/verify");
            assert_eq!(err.tls_failure(), Some(TlsFailure::Handshake), "{err}");
            assert_eq!(conns.load(Ordering::SeqCst), before + 1, "no second try");
        }

        // none never says STARTTLS
        let before = conns.load(Ordering::SeqCst);
        let c = SmtpClient::open(&addr, "mx2.test", t, TlsPolicy::None, &trust)
            .await
            .unwrap();
        assert!(c.tls.is_none() && c.tls_fallback.is_none());
        assert_eq!(conns.load(Ordering::SeqCst), before + 1);
    }

    #[test]
    fn smtputf8_is_never_downgraded() {
        use crate::queue::message::{ClientInfo, MessageKind, Notify, QueueId};
        let env = |sender: &str, smtputf8: bool, rcpts: &[&str]| Envelope {
            id: QueueId(1),
            kind: MessageKind::Mail,
            arrival: 0,
            sender: sender.into(),
            recipients: rcpts
                .iter()
                .map(|a| Recipient::new((*a).into(), None, Notify::default()))
                .collect(),
            size: 0,
            env_id: None,
            ret: None,
            smtputf8,
            eight_bit: false,
            client: ClientInfo::default(),
            held: false,
            delay_warned: false,
        };
        let refused = |e: &Envelope, body: &[u8], offered: bool| {
            let rcpts: Vec<(usize, &Recipient)> = e.recipients.iter().enumerate().collect();
            smtputf8_refusals(e, &rcpts, body, offered)
        };
        let ascii_body = b"Subject: hi\r\n\r\nbody: gr\xc3\xbc\xc3\x9fe\r\n";
        let mixed = env(
            "s@sender.test",
            true,
            &["a@example.test", "jürgen@example.test"],
        );
        // offered: everything goes, with SMTPUTF8
        assert!(refused(&mixed, ascii_body, true).is_empty());
        // not offered: only the recipient that needs it fails (the body is 8BITMIME's business)
        assert_eq!(refused(&mixed, ascii_body, false), vec![1]);
        // a UTF-8 sender or header: the whole message needs it
        let from_utf8 = env("jürgen@sender.test", true, &["a@example.test"]);
        assert_eq!(refused(&from_utf8, ascii_body, false), vec![0]);
        let utf8_header = env("s@sender.test", true, &["a@example.test"]);
        assert_eq!(
            refused(&utf8_header, "Subject: grüße\r\n\r\nx".as_bytes(), false),
            vec![0]
        );
        // marked SMTPUTF8 but all ASCII: sent as it is; not marked: not our call
        assert!(refused(&utf8_header, ascii_body, false).is_empty());
        assert!(
            refused(
                &env("s@sender.test", false, &["a@example.test"]),
                ascii_body,
                false
            )
            .is_empty()
        );
    }

    #[test]
    fn xtext_escapes() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }

    // === a scripted server that misbehaves on cue ===

    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, BufReader};

    use crate::queue::message::{ClientInfo, MessageKind, Notify, QueueId};

    /// What the scripted server does in answer to one step.
    #[derive(Clone)]
    enum Answer {
        /// These bytes, in one write.
        Send(Vec<u8>),
        /// These bytes, one write per byte.
        Trickle(Vec<u8>),
        /// These bytes after a pause (virtual time under a paused clock).
        Late(Duration, Vec<u8>),
        /// These bytes, then nothing more is read or written; the connection stays open.
        Stall(Vec<u8>),
        /// These bytes, then the server hangs up.
        Last(Vec<u8>),
        /// Nothing; the server reads on.
        Silence,
        /// The server hangs up.
        Close,
    }

    fn send(bytes: &[u8]) -> Answer {
        Answer::Send(bytes.to_vec())
    }

    /// The scripted server's answer to each step; the default is a well-behaved ESMTP server.
    #[derive(Clone)]
    struct Script {
        greeting: Answer,
        ehlo: Answer,
        mail: Answer,
        rcpt: Answer,
        data: Answer,
        dot: Answer,
    }

    impl Default for Script {
        fn default() -> Self {
            Script {
                greeting: send(b"220 p.test ESMTP\r\n"),
                ehlo: send(b"250-p.test\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"),
                mail: send(b"250 2.1.0 Ok\r\n"),
                rcpt: send(b"250 2.1.5 Ok\r\n"),
                data: send(b"354 End data with <CR><LF>.<CR><LF>\r\n"),
                dot: send(b"250 2.0.0 Ok: queued\r\n"),
            }
        }
    }

    impl Script {
        /// The default server without PIPELINING: every command waits for its reply.
        fn lockstep() -> Self {
            Script {
                ehlo: send(b"250-p.test\r\n250 SIZE 1000000\r\n"),
                ..Script::default()
            }
        }
    }

    /// What the scripted server saw: the commands in order, and the final dots it received.
    #[derive(Default, Debug)]
    struct Seen {
        commands: Vec<String>,
        dots: usize,
    }

    /// Plays `script` on one connection. Returns when the client or the script hangs up.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        stream: S,
        script: Script,
        seen: Arc<Mutex<Seen>>,
    ) {
        /// `false`: the connection is over.
        async fn answer<W: AsyncWrite + Unpin>(w: &mut W, a: &Answer) -> bool {
            let ok = match a {
                Answer::Send(b) => w.write_all(b).await.is_ok(),
                Answer::Trickle(b) => {
                    let mut ok = true;
                    for byte in b {
                        ok &= w.write_all(&[*byte]).await.is_ok() && w.flush().await.is_ok();
                    }
                    ok
                }
                Answer::Late(after, b) => {
                    tokio::time::sleep(*after).await;
                    w.write_all(b).await.is_ok()
                }
                Answer::Stall(b) => {
                    let _ = w.write_all(b).await;
                    std::future::pending::<()>().await;
                    false
                }
                Answer::Last(b) => {
                    let _ = w.write_all(b).await;
                    false
                }
                Answer::Silence => true,
                Answer::Close => false,
            };
            ok && w.flush().await.is_ok()
        }
        let mut r = BufReader::new(stream);
        if !answer(r.get_mut(), &script.greeting).await {
            return;
        }
        let mut line = Vec::new();
        loop {
            line.clear();
            if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let cmd = String::from_utf8_lossy(&line).trim_end().to_owned();
            seen.lock().unwrap().commands.push(cmd.clone());
            let verb = cmd.get(..4).unwrap_or("").to_ascii_uppercase();
            let a = match verb.as_str() {
                "EHLO" | "HELO" => script.ehlo.clone(),
                "MAIL" => script.mail.clone(),
                "RCPT" => script.rcpt.clone(),
                "DATA" => script.data.clone(),
                "RSET" => send(b"250 2.0.0 Ok\r\n"),
                "QUIT" => {
                    let _ = r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await;
                    return;
                }
                _ => send(b"502 5.5.2 Error: command not recognized\r\n"),
            };
            if !answer(r.get_mut(), &a).await {
                return;
            }
            let data_accepted = match &a {
                Answer::Send(b) | Answer::Trickle(b) | Answer::Late(_, b) => b.starts_with(b"354"),
                _ => false,
            };
            if verb == "DATA" && data_accepted {
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if line == b".\r\n" {
                        break;
                    }
                }
                seen.lock().unwrap().dots += 1;
                if !answer(r.get_mut(), &script.dot).await {
                    return;
                }
            }
        }
    }

    /// The scripted server on 127.0.0.1, for any number of connections.
    async fn scripted(script: Script) -> (String, Arc<Mutex<Seen>>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = l.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, script.clone(), s.clone()));
            }
        });
        (addr, seen)
    }

    fn envelope() -> Envelope {
        Envelope {
            id: QueueId(1),
            kind: MessageKind::Mail,
            arrival: 0,
            sender: "a@sender.test".into(),
            recipients: vec![Recipient::new(
                "u@example.test".into(),
                None,
                Notify::default(),
            )],
            size: 0,
            env_id: None,
            ret: None,
            smtputf8: false,
            eight_bit: false,
            client: ClientInfo::default(),
            held: false,
            delay_warned: false,
        }
    }

    const BODY: &[u8] = b"Subject: t\r\n\r\nhello\r\n";

    /// Sends one message to one recipient over `c`.
    async fn send_one(c: &mut SmtpClient) -> Result<TxResult, ClientError> {
        let env = envelope();
        let rcpts: Vec<(usize, &Recipient)> = env.recipients.iter().enumerate().collect();
        c.send(&env, &rcpts, BODY, &AtOnce).await
    }

    /// Connects to `script` on TCP and sends one message; returns what `send` said, whether the
    /// connection is still usable, and what the server saw.
    async fn deliver_to(script: Script) -> (Result<TxResult, ClientError>, bool, Arc<Mutex<Seen>>) {
        let (addr, seen) = scripted(script).await;
        let mut c = SmtpClient::connect(&addr, "mx2.test", Duration::from_secs(10))
            .await
            .expect("the session opens");
        let r = send_one(&mut c).await;
        (r, c.usable(), seen)
    }

    fn violation_of(r: &Result<TxResult, ClientError>) -> Option<(Stage, &Violation)> {
        match r {
            Err(ClientError::Violation { stage, violation }) => Some((*stage, violation)),
            _ => None,
        }
    }

    fn code_of(v: Option<(Stage, &Violation)>) -> Option<(Stage, u16)> {
        match v {
            Some((stage, Violation::UnexpectedReply(reply))) => Some((stage, reply.code)),
            _ => None,
        }
    }

    #[test]
    fn only_smtp_reply_lines_parse() {
        assert_eq!(parse_line(b"250"), Ok((250, false, String::new())));
        assert_eq!(parse_line(b"250 ok"), Ok((250, false, "ok".into())));
        assert_eq!(
            parse_line(b"250-PIPELINING"),
            Ok((250, true, "PIPELINING".into()))
        );
        assert_eq!(
            parse_line(b"554 5.7.1 a\tb"),
            Ok((554, false, "5.7.1 a\tb".into()))
        );
        for bad in [
            &b""[..],
            b"25",
            b"hello world",
            b"2500 ok",
            b"250x",
            b"150 not smtp",
            b"600 not smtp",
            b"250 a\0b",
            b"250 \x1b[31mred",
        ] {
            assert!(
                matches!(parse_line(bad), Err(Violation::Malformed(_))),
                "{:?} parsed",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn a_2xx_to_data_is_a_protocol_error_not_a_delivery() {
        for base in [Script::default(), Script::lockstep()] {
            let (r, usable, seen) = deliver_to(Script {
                data: send(b"250 2.0.0 Ok\r\n"),
                ..base
            })
            .await;
            assert_eq!(code_of(violation_of(&r)), Some((Stage::Data, 250)), "{r:?}");
            assert!(!usable, "the connection is dropped");
            assert_eq!(seen.lock().unwrap().dots, 0, "no data was sent");
        }
    }

    #[tokio::test]
    async fn a_refusal_of_data_is_the_recipients_result() {
        for (reply, want) in [
            (&b"451 4.3.0 try later\r\n"[..], "Deferred"),
            (b"554 5.5.1 no valid recipients\r\n", "Failed"),
        ] {
            let (r, usable, _) = deliver_to(Script {
                data: send(reply),
                ..Script::default()
            })
            .await;
            let tx = r.expect("a refusal is a result");
            let got = match &tx.results[..] {
                [(0, RcptResult::Deferred(_))] => "Deferred",
                [(0, RcptResult::Failed(_))] => "Failed",
                other => panic!("{other:?}"),
            };
            assert_eq!(got, want);
            assert!(usable, "RSET was answered: the connection is kept");
        }
    }

    #[tokio::test]
    async fn only_a_2xx_to_the_final_dot_delivers() {
        let (r, usable, seen) = deliver_to(Script::default()).await;
        let tx = r.unwrap();
        assert!(
            matches!(&tx.results[..], [(0, RcptResult::Delivered(_))]),
            "{tx:?}"
        );
        assert!(usable);
        assert_eq!(seen.lock().unwrap().dots, 1);
        // a 3xx to the dot: the server is out of step, and may have committed
        let (r, _, _) = deliver_to(Script {
            dot: send(b"354 more?\r\n"),
            ..Script::default()
        })
        .await;
        match r {
            Err(ClientError::UnknownOutcome(e)) => assert!(
                matches!(*e, ClientError::Violation { stage: Stage::FinalDot, violation: Violation::UnexpectedReply(ref reply) } if reply.code == 354),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_line_after_the_greeting_is_a_protocol_error() {
        let (addr, seen) = scripted(Script {
            greeting: send(b"220 p.test ESMTP\r\n250 2.0.0 extra\r\n"),
            ..Script::default()
        })
        .await;
        let err = SmtpClient::connect(&addr, "mx2.test", Duration::from_secs(10))
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(&err, ClientError::Violation { stage: Stage::Ehlo, violation: Violation::Unsolicited(line) } if line == "250 2.0.0 extra"),
            "{err}"
        );
        assert!(
            seen.lock().unwrap().commands.is_empty(),
            "EHLO was not sent"
        );

        // a line with another code inside the greeting
        let (addr, _) = scripted(Script {
            greeting: send(b"220-p.test ESMTP\r\n250 2.0.0 extra\r\n"),
            ..Script::default()
        })
        .await;
        let err = SmtpClient::connect(&addr, "mx2.test", Duration::from_secs(10))
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(
                err,
                ClientError::Violation {
                    stage: Stage::Greeting,
                    violation: Violation::MixedCodes {
                        first: 220,
                        then: 250
                    }
                }
            ),
            "{err}"
        );
    }

    #[tokio::test]
    async fn two_replies_to_one_command_are_a_protocol_error() {
        // in lockstep: the second reply to MAIL is waiting when RCPT would be sent
        let (r, usable, seen) = deliver_to(Script {
            mail: send(b"250 2.1.0 Ok\r\n250 2.1.0 Ok\r\n"),
            ..Script::lockstep()
        })
        .await;
        assert!(
            matches!(
                violation_of(&r),
                Some((Stage::Rcpt, Violation::Unsolicited(_)))
            ),
            "{r:?}"
        );
        assert!(!usable);
        assert_eq!(seen.lock().unwrap().commands.len(), 2, "EHLO and MAIL only");

        // pipelined: the second reply to RCPT is taken for DATA's, and DATA is owed a 354
        let (r, _, seen) = deliver_to(Script {
            rcpt: send(b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"),
            ..Script::default()
        })
        .await;
        assert_eq!(code_of(violation_of(&r)), Some((Stage::Data, 250)), "{r:?}");
        assert_eq!(seen.lock().unwrap().dots, 0);

        // a second reply to DATA would be read as the dot's
        let (r, _, seen) = deliver_to(Script {
            data: send(b"354 go\r\n250 2.0.0 Ok\r\n"),
            ..Script::default()
        })
        .await;
        assert!(
            matches!(
                violation_of(&r),
                Some((Stage::DataBlock, Violation::Unsolicited(_)))
            ),
            "{r:?}"
        );
        assert_eq!(
            seen.lock().unwrap().dots,
            0,
            "no data after an out-of-step 354"
        );

        // two replies to the dot: neither can be trusted, and the server may have committed
        let (r, usable, _) = deliver_to(Script {
            dot: send(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"),
            ..Script::default()
        })
        .await;
        match r {
            Err(ClientError::UnknownOutcome(e)) => assert!(
                matches!(
                    *e,
                    ClientError::Violation {
                        stage: Stage::FinalDot,
                        violation: Violation::Unsolicited(_)
                    }
                ),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(!usable);
    }

    #[tokio::test]
    async fn a_421_after_the_reply_to_the_dot_only_ends_the_session() {
        let (r, usable, _) = deliver_to(Script {
            dot: send(b"250 2.0.0 Ok\r\n421 4.3.2 shutting down\r\n"),
            ..Script::default()
        })
        .await;
        let tx = r.expect("the 250 stands");
        assert!(
            matches!(&tx.results[..], [(0, RcptResult::Delivered(_))]),
            "{tx:?}"
        );
        assert!(!usable, "the server is closing");
    }

    #[tokio::test]
    async fn acceptances_after_a_refused_pipelined_mail_are_a_protocol_error() {
        // the RCPT and DATA were answered as if MAIL had been taken: a 354 here would make the
        // server read what follows as message data
        let (r, usable, _) = deliver_to(Script {
            mail: send(b"550 5.1.0 sender refused\r\n"),
            ..Script::default()
        })
        .await;
        assert_eq!(code_of(violation_of(&r)), Some((Stage::Rcpt, 250)), "{r:?}");
        assert!(!usable);
        // refused properly: the sender's refusal is every recipient's result
        let (r, usable, _) = deliver_to(Script {
            mail: send(b"550 5.1.0 sender refused\r\n"),
            rcpt: send(b"503 5.5.1 need MAIL\r\n"),
            data: send(b"503 5.5.1 need RCPT\r\n"),
            ..Script::default()
        })
        .await;
        assert!(matches!(
            &r.unwrap().results[..],
            [(0, RcptResult::Failed(_))]
        ));
        assert!(usable);
    }

    /// Reads at most one byte per call: every reply arrives split across reads.
    struct OneByteReads<S>(S);

    impl<S: AsyncRead + Unpin> AsyncRead for OneByteReads<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let mut one = [0u8; 1];
            let mut b = ReadBuf::new(&mut one);
            match Pin::new(&mut self.0).poll_read(cx, &mut b) {
                Poll::Ready(Ok(())) => {
                    buf.put_slice(b.filled());
                    Poll::Ready(Ok(()))
                }
                other => other,
            }
        }
    }

    impl<S: AsyncWrite + Unpin> AsyncWrite for OneByteReads<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn replies_split_across_reads_parse() {
        let trickle = |b: &[u8]| Answer::Trickle(b.to_vec());
        let script = Script {
            greeting: trickle(b"220-p.test\r\n220 ESMTP\r\n"),
            ehlo: trickle(b"250-p.test\r\n250-PIPELINING\r\n250-DSN\r\n250 SIZE 1000000\r\n"),
            mail: trickle(b"250 2.1.0 Ok\r\n"),
            rcpt: trickle(b"250 2.1.5 Ok\r\n"),
            data: trickle(b"354 go ahead\r\n"),
            dot: trickle(b"250 2.0.0 Ok: queued\r\n"),
        };
        let (addr, seen) = scripted(script).await;
        let tcp = TcpStream::connect(&addr).await.unwrap();
        let mut c = SmtpClient::start(
            Box::new(OneByteReads(tcp)),
            "mx2.test",
            Timeouts::uniform(Duration::from_secs(10)),
        )
        .await
        .expect("the session opens");
        assert_eq!(c.greeting.lines, ["p.test", "ESMTP"]);
        assert!(c.caps.pipelining && c.caps.dsn);
        assert_eq!(c.caps.size, Some(1_000_000));
        for _ in 0..2 {
            let tx = send_one(&mut c).await.unwrap();
            assert!(
                matches!(&tx.results[..], [(0, RcptResult::Delivered(_))]),
                "{tx:?}"
            );
        }
        assert!(c.usable());
        assert_eq!(seen.lock().unwrap().dots, 2);
    }

    #[tokio::test]
    async fn an_oversized_reply_is_a_protocol_error() {
        // many lines
        let mut long = Vec::new();
        while long.len() <= MAX_REPLY {
            long.extend_from_slice(
                b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n",
            );
        }
        long.extend_from_slice(b"250 Ok\r\n");
        let (r, usable, _) = deliver_to(Script {
            mail: Answer::Send(long),
            ..Script::default()
        })
        .await;
        assert!(
            matches!(violation_of(&r), Some((Stage::Mail, Violation::TooLong))),
            "{r:?}"
        );
        assert!(!usable);
        // one line that never ends
        let (r, _, _) = deliver_to(Script {
            rcpt: Answer::Stall(vec![b'2'; MAX_REPLY + 10]),
            ..Script::default()
        })
        .await;
        assert!(
            matches!(violation_of(&r), Some((Stage::Rcpt, Violation::TooLong))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn garbage_is_a_protocol_error() {
        let (r, usable, seen) = deliver_to(Script {
            rcpt: send(b"hello there\r\n"),
            ..Script::default()
        })
        .await;
        assert!(
            matches!(violation_of(&r), Some((Stage::Rcpt, Violation::Malformed(line))) if line == "hello there"),
            "{r:?}"
        );
        assert!(!usable);
        assert_eq!(seen.lock().unwrap().dots, 0);
        // a reply to the dot that is not one: unknown whether the server committed
        let (r, _, _) = deliver_to(Script {
            dot: send(b"\x00\x01garbage\r\n"),
            ..Script::default()
        })
        .await;
        match r {
            Err(ClientError::UnknownOutcome(e)) => assert!(
                matches!(
                    *e,
                    ClientError::Violation {
                        stage: Stage::FinalDot,
                        violation: Violation::Malformed(_)
                    }
                ),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_connection_closed_after_the_dot_is_an_unknown_outcome() {
        let (r, usable, seen) = deliver_to(Script {
            dot: Answer::Close,
            ..Script::default()
        })
        .await;
        match r {
            Err(ClientError::UnknownOutcome(e)) => {
                assert!(matches!(*e, ClientError::Closed(Stage::FinalDot)), "{e}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!usable);
        assert_eq!(seen.lock().unwrap().dots, 1);
    }

    #[tokio::test]
    async fn a_reused_connection_the_server_closed_is_stale() {
        let (addr, seen) = scripted(Script {
            dot: Answer::Last(b"250 2.0.0 Ok\r\n".to_vec()),
            ..Script::default()
        })
        .await;
        let mut c = SmtpClient::connect(&addr, "mx2.test", Duration::from_secs(10))
            .await
            .unwrap();
        let tx = send_one(&mut c)
            .await
            .expect("a hang-up after the reply does not undo it");
        assert!(
            matches!(&tx.results[..], [(0, RcptResult::Delivered(_))]),
            "{tx:?}"
        );
        // the next message: the hang-up is seen before its dot, so a new connection may retry
        let err = send_one(&mut c).await.expect_err("the connection is gone");
        assert!(err.is_stale_connection(), "{err}");
        assert!(!err.is_unknown_outcome());
        assert_eq!(seen.lock().unwrap().dots, 1);
    }

    /// A session over an in-memory stream to `script`, under the replay time-outs (commands
    /// 60 s, final dot 10 min). For tests under a paused clock: waits cost no real time.
    async fn paused_session(script: Script) -> Result<(SmtpClient, Arc<Mutex<Seen>>), ClientError> {
        let (client, server) = tokio::io::duplex(1024);
        let seen = Arc::new(Mutex::new(Seen::default()));
        tokio::spawn(serve(server, script, seen.clone()));
        let timeouts = Timeouts::rfc5321(Duration::from_secs(60), Duration::from_secs(600));
        let c = SmtpClient::start(Box::new(client), "mx2.test", timeouts).await?;
        Ok((c, seen))
    }

    fn timed_out(e: &ClientError) -> Option<(Stage, Duration)> {
        match e {
            ClientError::Timeout { stage, after } => Some((*stage, *after)),
            ClientError::UnknownOutcome(inner) => timed_out(inner),
            _ => None,
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn each_wait_lasts_as_long_as_rfc_5321_says() {
        let late = |after: Duration, b: &[u8]| Answer::Late(after, b.to_vec());
        // just within every limit: the message is delivered
        let d = Script::lockstep();
        let (mut c, _) = paused_session(Script {
            greeting: late(5 * MIN - Duration::from_secs(1), b"220 p.test\r\n"),
            mail: late(5 * MIN - Duration::from_secs(1), b"250 Ok\r\n"),
            rcpt: late(5 * MIN - Duration::from_secs(1), b"250 Ok\r\n"),
            data: late(2 * MIN - Duration::from_secs(1), b"354 go\r\n"),
            dot: late(10 * MIN - Duration::from_secs(1), b"250 Ok: queued\r\n"),
            ..d.clone()
        })
        .await
        .expect("a slow greeting is waited for");
        let tx = send_one(&mut c).await.expect("slow replies are waited for");
        assert!(
            matches!(&tx.results[..], [(0, RcptResult::Delivered(_))]),
            "{tx:?}"
        );

        // silent at each step: each times out after its own limit
        let silent = |s: &dyn Fn(&mut Script)| {
            let mut script = d.clone();
            s(&mut script);
            script
        };
        let err = paused_session(silent(&|s| s.greeting = Answer::Silence))
            .await
            .err()
            .unwrap();
        assert_eq!(timed_out(&err), Some((Stage::Greeting, 5 * MIN)), "{err}");
        let err = paused_session(silent(&|s| s.ehlo = Answer::Silence))
            .await
            .err()
            .unwrap();
        assert_eq!(timed_out(&err), Some((Stage::Ehlo, MIN)), "{err}");
        for (script, want) in [
            (
                silent(&|s| s.mail = Answer::Silence),
                (Stage::Mail, 5 * MIN),
            ),
            (
                silent(&|s| s.rcpt = Answer::Silence),
                (Stage::Rcpt, 5 * MIN),
            ),
            (
                silent(&|s| s.data = Answer::Silence),
                (Stage::Data, 2 * MIN),
            ),
            // the server takes no data: the first block that does not fit waits 3 minutes
            (
                silent(&|s| s.data = Answer::Stall(b"354 go\r\n".to_vec())),
                (Stage::DataBlock, 3 * MIN),
            ),
            (
                silent(&|s| s.dot = Answer::Silence),
                (Stage::FinalDot, 10 * MIN),
            ),
        ] {
            let (mut c, _) = paused_session(script).await.unwrap();
            let env = envelope();
            let rcpts: Vec<(usize, &Recipient)> = env.recipients.iter().enumerate().collect();
            let body = vec![b'x'; 200_000];
            let err = c.send(&env, &rcpts, &body, &AtOnce).await.err().unwrap();
            assert_eq!(timed_out(&err), Some(want), "{err}");
            assert_eq!(
                err.is_unknown_outcome(),
                want.0 == Stage::FinalDot,
                "only a wait after the dot leaves the outcome unknown: {err}"
            );
            assert!(!c.usable());
        }
    }
}
