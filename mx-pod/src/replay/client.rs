//! The SMTP client replay delivers with: one connection, reused for many messages, pipelining
//! MAIL/RCPT/DATA when the server offers it, and a result for every recipient.
//!
//! Written here rather than taken from a client library because replay needs what the common
//! clients do not give: a separate outcome per recipient (accepted, `4xx`, `5xx`) from one
//! pipelined transaction, DSN parameters passed through unchanged, and `421` told apart from
//! other temporary failures (it lowers the concurrency). Replies are read line by line
//! (RFC 5321 4.2: `NNN-text` continues, `NNN text` ends), bounded in length.

use std::time::Duration;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
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
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection closed while waiting for {0}")]
    Closed(&'static str),
    #[error("{stage} refused: {reply}")]
    Refused {
        stage: &'static str,
        reply: ServerReply,
    },
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
    timeout: Duration,
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
    pub async fn connect(addr: &str, helo: &str, timeout: Duration) -> Result<Self, ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.to_owned(),
                error: format!("no answer within {timeout:?}"),
            })?
            .map_err(|e| ClientError::Connect {
                addr: addr.to_owned(),
                error: e.to_string(),
            })?;
        let _ = stream.set_nodelay(true);
        let mut c = SmtpClient::over(Box::new(stream), timeout);
        let greeting = c.read_reply("greeting").await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused {
                stage: "greeting",
                reply: greeting,
            });
        }
        c.greeting = greeting;
        c.hello(helo, "EHLO").await?;
        Ok(c)
    }

    /// A session on an open stream, before its greeting (or its TLS session) is read.
    fn over(stream: Box<dyn ClientIo>, timeout: Duration) -> Self {
        SmtpClient {
            stream,
            buf: Vec::with_capacity(4096),
            start: 0,
            timeout,
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
        timeout: Duration,
        policy: TlsPolicy,
        trust: &Trust,
    ) -> Result<Self, ClientError> {
        let client = Self::connect(addr, helo, timeout).await?;
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
                let mut c = Self::connect(addr, helo, timeout).await?;
                c.tls_fallback = Some(failure);
                Ok(c)
            }
            Err(e) => Err(e),
        }
    }

    /// Says EHLO (HELO when EHLO is refused) and keeps the capabilities; `stage` names the
    /// EHLO in errors.
    async fn hello(&mut self, helo: &str, stage: &'static str) -> Result<(), ClientError> {
        let ehlo = self.command(&format!("EHLO {helo}\r\n"), stage).await?;
        if ehlo.code == 250 {
            self.caps = Capabilities::parse(&ehlo);
        } else if ehlo.code == 421 {
            return Err(ClientError::Refused { stage, reply: ehlo });
        } else {
            let helo_reply = self.command(&format!("HELO {helo}\r\n"), "HELO").await?;
            if helo_reply.code != 250 {
                return Err(ClientError::Refused {
                    stage: "HELO",
                    reply: helo_reply,
                });
            }
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
        let reply = self.command("STARTTLS\r\n", "STARTTLS").await?;
        if reply.code != 220 {
            self.quit().await;
            return Err(ClientError::Tls {
                failure: TlsFailure::Refused,
                detail: format!("STARTTLS answered {reply}"),
            });
        }
        if self.start != self.buf.len() {
            return Err(ClientError::Protocol(
                "data after the 220 reply to STARTTLS (refused: plaintext injection)".into(),
            ));
        }
        let handshake = tokio::time::timeout(self.timeout, connector.connect(name, self.stream));
        let tls = handshake
            .await
            .map_err(|_| ClientError::Timeout("TLS handshake"))?
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
        let mut c = SmtpClient::over(Box::new(tls), self.timeout);
        c.greeting = self.greeting;
        c.hello(helo, "EHLO after STARTTLS").await?;
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
                let _ = self.command("QUIT\r\n", "QUIT").await;
            })
            .await;
        }
        let _ = self.stream.shutdown().await;
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let r = tokio::time::timeout(self.timeout, self.stream.write_all(bytes)).await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(ClientError::Io(e.to_string()))
            }
            Err(_) => {
                self.broken = true;
                Err(ClientError::Timeout("write"))
            }
        }
    }

    /// Sends one command and reads its reply.
    pub async fn command(
        &mut self,
        line: &str,
        stage: &'static str,
    ) -> Result<ServerReply, ClientError> {
        self.write(line.as_bytes()).await?;
        self.read_reply(stage).await
    }

    /// Reads one (possibly multi-line) reply.
    pub async fn read_reply(&mut self, stage: &'static str) -> Result<ServerReply, ClientError> {
        let mut lines = Vec::new();
        let mut code = 0u16;
        let mut total = 0usize;
        loop {
            let Some(nl) = self.buf[self.start..].iter().position(|&b| b == b'\n') else {
                if self.buf.len() - self.start > MAX_REPLY {
                    self.broken = true;
                    return Err(ClientError::Protocol("reply too long".into()));
                }
                self.fill(stage).await?;
                continue;
            };
            let raw = &self.buf[self.start..self.start + nl];
            self.start += nl + 1;
            let line = String::from_utf8_lossy(raw.strip_suffix(b"\r").unwrap_or(raw)).into_owned();
            total += line.len();
            if total > MAX_REPLY {
                self.broken = true;
                return Err(ClientError::Protocol("reply too long".into()));
            }
            let bytes = line.as_bytes();
            if bytes.len() < 3 || !bytes[..3].iter().all(u8::is_ascii_digit) {
                self.broken = true;
                return Err(ClientError::Protocol(format!(
                    "bad reply line {line:?} to {stage}"
                )));
            }
            let this: u16 = line[..3].parse().expect("three digits");
            if code != 0 && this != code {
                self.broken = true;
                return Err(ClientError::Protocol(format!(
                    "mixed reply codes to {stage}"
                )));
            }
            code = this;
            let more = bytes.get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if !more {
                if code == 421 {
                    // the server closes after 421
                    self.broken = true;
                }
                return Ok(ServerReply { code, lines });
            }
        }
    }

    async fn fill(&mut self, stage: &'static str) -> Result<(), ClientError> {
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        let mut chunk = [0u8; 8192];
        let n = match tokio::time::timeout(self.timeout, self.stream.read(&mut chunk)).await {
            Err(_) => {
                self.broken = true;
                return Err(ClientError::Timeout(stage));
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
    /// offered, and writes its final dot when `turn` allows. `Err` means nothing is known about
    /// any recipient (connection-level failure, or the message withdrawn).
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

        let pipelined = self.caps.pipelining;
        if pipelined {
            let mut batch = mail.clone();
            for r in &rcpts {
                batch.push_str(r);
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes()).await?;
        } else {
            self.write(mail.as_bytes()).await?;
        }

        let mail_reply = self.read_reply("MAIL").await?;
        if !mail_reply.is_positive() {
            if pipelined {
                // drain the replies to the pipelined RCPTs and DATA
                for _ in 0..=rcpts.len() {
                    if self.broken {
                        break;
                    }
                    self.read_reply("RCPT").await?;
                }
            }
            if mail_reply.code == 421 {
                return Err(ClientError::Refused {
                    stage: "MAIL",
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

        let mut accepted = Vec::new();
        for (k, (i, _)) in recipients.iter().enumerate() {
            if !pipelined {
                let line = rcpts[k].clone();
                self.write(line.as_bytes()).await?;
            }
            let reply = self.read_reply("RCPT").await?;
            if reply.is_positive() {
                accepted.push(*i);
            } else {
                out.throttled |= reply.code == 421;
                out.results.push((*i, classify(&reply)));
            }
            if self.broken {
                // 421: the rest is unknown; leave those recipients untouched
                return if accepted.is_empty() && out.results.is_empty() {
                    Err(ClientError::Refused {
                        stage: "RCPT",
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
            self.read_reply("DATA").await?
        } else if accepted.is_empty() {
            self.reset().await;
            return Ok(out);
        } else {
            self.command("DATA\r\n", "DATA").await?
        };
        if data_reply.code != 354 {
            out.throttled |= data_reply.code == 421;
            if !accepted.is_empty() {
                let r = classify(&data_reply);
                out.results.extend(accepted.iter().map(|i| (*i, r.clone())));
            }
            self.reset().await;
            return Ok(out);
        }
        if accepted.is_empty() {
            // a server that said 354 with no recipient: send an empty message it will refuse
            self.write(b".\r\n").await?;
            let _ = self.read_reply("end of data").await?;
            self.reset().await;
            return Ok(out);
        }
        let mut data = dot_stuff(body);
        if turn.ready() {
            data.extend_from_slice(b".\r\n");
            self.write(&data).await?;
        } else {
            // everything but the dot now, the dot in turn: the wait costs no transfer time
            self.write(&data).await?;
            if !turn.wait().await {
                // SMTP has no way to cancel DATA: a connection closed before the dot is a
                // message the server discards (RFC 5321 4.1.1.4)
                self.broken = true;
                return Err(ClientError::Withdrawn);
            }
            self.write(b".\r\n").await?;
        }
        let final_reply = self.read_reply("end of data").await?;
        out.throttled |= final_reply.code == 421;
        let r = classify(&final_reply);
        out.results.extend(accepted.iter().map(|i| (*i, r.clone())));
        Ok(out)
    }

    async fn reset(&mut self) {
        if !self.broken && self.command("RSET\r\n", "RSET").await.is_err() {
            self.broken = true;
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
}
