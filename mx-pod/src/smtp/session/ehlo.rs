//! EHLO and HELO (RFC 5321 4.1.1.1): name the client, reset the transaction and, for EHLO, list
//! the extensions offered.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Session, sanitize};
use crate::reply::Reply;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// `extended` is EHLO: the reply lists the extensions (STARTTLS only before TLS is on).
    pub(super) fn ehlo(&mut self, host: String, extended: bool) {
        self.tx = None;
        if extended {
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
        } else {
            let r = Reply::dynamic(250, "", self.ctx.config.hostname.clone());
            self.send(&r);
        }
        self.helo = Some(host);
    }
}
