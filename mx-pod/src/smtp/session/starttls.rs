//! STARTTLS (RFC 3207): upgrades the connection in place and starts the session afresh.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info, warn};

use super::{End, Session};
use crate::{
    reply::{self, RejectReason},
    smtp::tls::Io,
};

/// How long a TLS handshake may take.
const TLS_TIMEOUT: Duration = Duration::from_secs(30);

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// STARTTLS: `220`, then the handshake on the same connection. Anything the client sent
    /// after the command and before the handshake is discarded (CVE-2011-0411: commands injected
    /// in plaintext must not run inside the encrypted session).
    pub(super) async fn start_tls(&mut self) -> std::io::Result<Option<End>> {
        let Some(tls) = self.ctx.tls.clone() else {
            return Ok(self.reject_error(RejectReason::NotImplemented, "starttls"));
        };
        if self.io.tls_version().is_some() {
            return Ok(self.sequence_error(&reply::BAD_SEQUENCE_TLS));
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
}
