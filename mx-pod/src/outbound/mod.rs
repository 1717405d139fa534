//! The SMTP client replay delivers with: one connection, reused for many messages, pipelining
//! MAIL/RCPT/DATA when the server offers it, and a result for every recipient.
//!
//! Written here rather than taken from a client library because replay needs what the common
//! clients do not give: a separate outcome per recipient (accepted, `4xx`, `5xx`) from one
//! pipelined transaction, DSN parameters passed through unchanged, and `421` told apart from
//! other temporary failures (it lowers the concurrency). Replies are parsed by smtp-proto's
//! [`ResponseReceiver`] (RFC 5321 4.2: `NNN-text` continues, `NNN text` ends), with the checks
//! it does not make around it ([`ReplyReader`]).
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

use serde::{Deserialize, Serialize};
use smtp_proto::{
    Response,
    response::parser::{MAX_RESPONSE_LENGTH, ResponseReceiver},
};

use crate::trust::{TlsPolicy, Trust, error_chain, server_name};

/// One message as MAIL FROM says it: the sender and the parameters the server is told.
/// Built from a queued envelope by replay and DSNs, or directly (the operator's alert mail).
#[derive(Debug, Clone, Copy, Default)]
pub struct Transaction<'a> {
    /// The reverse path, without angle brackets (empty: the null sender).
    pub sender: &'a str,
    pub ret: Option<DsnRet>,
    pub env_id: Option<&'a str>,
    /// The message needs SMTPUTF8 (RFC 6531): never sent to a server that does not offer it.
    pub smtputf8: bool,
    /// The body is 8-bit (`BODY=8BITMIME` where offered).
    pub eight_bit: bool,
}

/// One RCPT TO: the address and its RFC 3461 parameters.
#[derive(Debug, Clone, Copy)]
pub struct Rcpt<'a> {
    pub address: &'a str,
    pub notify: Notify,
    pub orcpt: Option<&'a str>,
}

impl<'a> Rcpt<'a> {
    /// A recipient without DSN parameters.
    pub fn plain(address: &'a str) -> Self {
        Rcpt {
            address,
            notify: Notify::default(),
            orcpt: None,
        }
    }
}

/// RFC 3461 `RET=` of MAIL FROM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DsnRet {
    Full,
    Hdrs,
}

/// RFC 3461 NOTIFY flags of one recipient; `None` of all three means the default (failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Notify {
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub failure: bool,
    #[serde(default)]
    pub delay: bool,
    #[serde(default)]
    pub never: bool,
    /// True when the client sent an explicit NOTIFY parameter.
    #[serde(default)]
    pub explicit: bool,
}

impl Notify {
    /// Whether a failure DSN should be sent for this recipient.
    pub fn on_failure(&self) -> bool {
        !self.never && (!self.explicit || self.failure)
    }
    /// Whether a delay DSN should be sent for this recipient.
    pub fn on_delay(&self) -> bool {
        !self.never && (!self.explicit || self.delay)
    }
}

/// What the server said about one recipient, in the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// A `2xx` to the final dot: committed.
    Delivered(String),
    /// A `4xx`: try again later.
    Deferred(String),
    /// A `5xx`: bounce.
    Failed(String),
}

/// Longest reply accepted from a server, all lines together, line ends included: smtp-proto's
/// own cap on a reply's text. Counted on the raw bytes, ours is reached first, so the error
/// names the cap that applies.
const MAX_REPLY: usize = MAX_RESPONSE_LENGTH;

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

    /// Reads one (possibly multi-line) reply, whole within the time-out of `stage`. Takes no
    /// byte past its end: what follows is for [`SmtpClient::expect_quiet`] to judge.
    pub async fn read_reply(&mut self, stage: Stage) -> Result<ServerReply, ClientError> {
        let deadline = Instant::now() + self.timeouts.of(stage);
        let mut reader = ReplyReader::default();
        loop {
            let (taken, reply) = match reader.read(&self.buf[self.start..]) {
                Ok(read) => read,
                Err(v) => return Err(self.violation(stage, v)),
            };
            self.start += taken;
            if let Some(reply) = reply {
                if reply.code == 421 {
                    // the server closes after 421
                    self.broken = true;
                }
                return Ok(reply);
            }
            self.fill(stage, deadline).await?;
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
        env: &Transaction<'_>,
        recipients: &[(usize, Rcpt<'_>)],
        body: &[u8],
        turn: &impl CommitTurn,
    ) -> Result<TxResult, ClientError> {
        let refused = smtputf8_refusals(env, recipients, body, self.caps.smtputf8);
        if refused.is_empty() {
            return self.transact(env, recipients, body, turn).await;
        }
        let rest: Vec<(usize, Rcpt<'_>)> = recipients
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
        env: &Transaction<'_>,
        recipients: &[(usize, Rcpt<'_>)],
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
    fn mail_command(&self, env: &Transaction<'_>, size: usize) -> String {
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

    fn rcpt_command(&self, r: &Rcpt<'_>) -> String {
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
    env: &Transaction<'_>,
    recipients: &[(usize, Rcpt<'_>)],
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
fn rcpt_line(caps: &Capabilities, r: &Rcpt<'_>) -> String {
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

/// One reply as it arrives. smtp-proto's [`ResponseReceiver`] parses it: the code, which line
/// ends it, the enhanced status code. It is made for a client that trusts its server; replay
/// must never take one reply for another, so each complete line is also checked here:
/// - no control character but tab: smtp-proto passes them into the text, and drops a stray CR;
/// - the code is 200 to 599: smtp-proto takes any three digits;
/// - every line repeats the first line's code: smtp-proto reads the first line's code only, so
///   `250-ok` then `550 no` would be a `250`;
/// - at most [`MAX_REPLY`] bytes, a line that never ends included.
#[derive(Default)]
struct ReplyReader {
    receiver: ResponseReceiver,
    /// The first line's code, as it was written.
    code: Option<[u8; 3]>,
    /// Bytes taken so far.
    taken: usize,
}

impl ReplyReader {
    /// Reads the complete lines at the start of `bytes`, up to the end of the reply. Returns how
    /// many bytes it took, and the reply once its last line is in.
    fn read(&mut self, bytes: &[u8]) -> Result<(usize, Option<ServerReply>), Violation> {
        let mut taken = 0;
        while let Some(nl) = bytes[taken..].iter().position(|&b| b == b'\n') {
            let line = &bytes[taken..taken + nl];
            taken += nl + 1;
            self.taken += nl + 1;
            if self.taken > MAX_REPLY {
                return Err(Violation::TooLong);
            }
            if let Some(reply) = self.line(line.strip_suffix(b"\r").unwrap_or(line))? {
                return Ok((taken, Some(reply)));
            }
        }
        if self.taken + bytes.len() - taken > MAX_REPLY {
            return Err(Violation::TooLong);
        }
        Ok((taken, None))
    }

    /// One line without its line end; the reply if it was the last.
    fn line(&mut self, raw: &[u8]) -> Result<Option<ServerReply>, Violation> {
        let malformed = || {
            Violation::Malformed(String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned())
        };
        if raw.iter().any(|&b| (b < 32 && b != b'\t') || b == 127) {
            return Err(malformed());
        }
        // always fed with CRLF: after a partial status code (`250 2.1`) a bare LF would end up
        // in the text
        let mut response = None;
        for part in [raw, b"\r\n"] {
            match self.receiver.parse(&mut part.iter()) {
                Ok(r) => response = Some(r),
                Err(smtp_proto::Error::NeedsMoreData { .. }) => {}
                Err(smtp_proto::Error::ResponseTooLong) => return Err(Violation::TooLong),
                Err(_) => return Err(malformed()),
            }
        }
        // smtp-proto took the line: it starts with three digits
        let Some(&code) = raw.first_chunk::<3>() else {
            return Err(malformed());
        };
        match self.code {
            None if !(b'2'..=b'5').contains(&code[0]) => return Err(malformed()),
            None => self.code = Some(code),
            Some(first) if first != code => {
                return Err(Violation::MixedCodes {
                    first: number(first),
                    then: number(code),
                });
            }
            Some(_) => {}
        }
        Ok(response.map(ServerReply::from))
    }
}

/// A reply code as written, smtp-proto having checked that it is three digits.
fn number(code: [u8; 3]) -> u16 {
    code.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0'))
}

/// smtp-proto gives the text of every line without its enhanced status code, and the code
/// apart. It goes back in front of the first line, so the reply reads `550 5.7.1 text` in logs
/// and in DSNs, whose `Status:` is taken from there. Written as smtp-proto read it: leading
/// zeros dropped, and a part over 255 (RFC 3463 allows three digits, no registered code needs
/// them) reads 255, as smtp-proto keeps each part in a byte.
impl From<Response<String>> for ServerReply {
    fn from(r: Response<String>) -> Self {
        // a CR here can only be the line end after a partial status code: the lines were
        // checked for any other
        let mut lines: Vec<String> = r
            .message
            .split('\n')
            .map(|l| l.strip_suffix('\r').unwrap_or(l).to_owned())
            .collect();
        if let (Some(first), [class, subject, detail]) = (lines.first_mut(), r.esc)
            && r.esc != [0, 0, 0]
        {
            let esc = format!("{class}.{subject}.{detail}");
            *first = if first.is_empty() {
                esc
            } else {
                format!("{esc} {first}")
            };
        }
        ServerReply {
            code: r.code,
            lines,
        }
    }
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
pub(crate) mod script;
#[cfg(test)]
mod tests;
