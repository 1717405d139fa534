//! STARTTLS (RFC 3207) with rustls: TLS 1.2 and 1.3 only, the certificate and key read from PEM
//! files and re-read when either file changes (a renewed certificate is used by the next
//! STARTTLS without a restart; a broken new pair keeps the previous one in service and is
//! logged). [`Io`] is the session's stream, plain or upgraded in place.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::SystemTime,
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::{error, info};

use crate::config::TlsConfig;

/// The session's byte stream: plain, or TLS after STARTTLS.
pub enum Io<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
    /// Only while the handshake runs (or after it failed).
    Upgrading,
}

impl<S> Io<S> {
    /// The negotiated TLS version (`TLSv1.3`), when encrypted.
    pub fn tls_version(&self) -> Option<&'static str> {
        match self {
            Io::Tls(t) => t.get_ref().1.protocol_version().map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
                _ => "TLS",
            }),
            _ => None,
        }
    }

    /// The negotiated cipher suite, when encrypted.
    pub fn tls_cipher(&self) -> Option<String> {
        match self {
            Io::Tls(t) => t
                .get_ref()
                .1
                .negotiated_cipher_suite()
                .map(|c| format!("{:?}", c.suite())),
            _ => None,
        }
    }
}

fn upgrading() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "TLS handshake failed")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Io<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Io::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Io<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Io::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s).poll_flush(cx),
            Io::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Io::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// The TLS acceptor, reloaded when the certificate or key file changes.
pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: Mutex<Loaded>,
}

struct Loaded {
    stamp: (Option<SystemTime>, Option<SystemTime>),
    acceptor: TlsAcceptor,
}

fn modified(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Builds a server config from PEM files (TLS 1.2+).
pub fn load(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("{}: {e}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("{}: no usable private key: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{} / {}: {e}", cert_file.display(), key_file.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl Tls {
    /// Loads the pair now: a bad certificate is a start-up error naming the file.
    pub fn new(config: &TlsConfig) -> Result<Self, String> {
        let acceptor = load(&config.cert_file, &config.key_file)?;
        Ok(Self {
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            current: Mutex::new(Loaded {
                stamp: (modified(&config.cert_file), modified(&config.key_file)),
                acceptor,
            }),
        })
    }

    /// The acceptor to use now, reloading first when a file changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let stamp = (modified(&self.cert_file), modified(&self.key_file));
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if stamp != current.stamp {
            match load(&self.cert_file, &self.key_file) {
                Ok(acceptor) => {
                    info!(cert = %self.cert_file.display(), "TLS certificate reloaded");
                    current.acceptor = acceptor;
                    current.stamp = stamp;
                }
                Err(e) => {
                    // keep serving with the previous pair; retried at the next STARTTLS
                    error!(error = %e, "cannot reload the TLS certificate; keeping the previous one");
                }
            }
        }
        current.acceptor.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn write_pair(dir: &Path, name: &str) {
        let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    }

    fn touch(p: &Path, t: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    #[test]
    fn a_changed_certificate_is_reloaded_and_a_broken_one_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a.test");
        let cfg = TlsConfig {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
        };
        let tls = Tls::new(&cfg).unwrap();
        let first = tls.acceptor();
        assert!(
            Arc::ptr_eq(first.config(), tls.acceptor().config()),
            "unchanged: same config"
        );

        write_pair(dir.path(), "b.test");
        let later = SystemTime::now() + Duration::from_secs(10);
        touch(&cfg.cert_file, later);
        let second = tls.acceptor();
        assert!(!Arc::ptr_eq(first.config(), second.config()), "reloaded");

        std::fs::write(&cfg.cert_file, "not a certificate").unwrap();
        touch(&cfg.cert_file, later + Duration::from_secs(10));
        let third = tls.acceptor();
        assert!(
            Arc::ptr_eq(second.config(), third.config()),
            "broken pair: previous kept"
        );
    }

    #[test]
    fn a_bad_certificate_is_a_startup_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), "junk").unwrap();
        std::fs::write(dir.path().join("key.pem"), "junk").unwrap();
        let err = Tls::new(&TlsConfig {
            cert_file: dir.path().join("cert.pem"),
            key_file: dir.path().join("key.pem"),
        })
        .err()
        .unwrap();
        assert!(err.contains("cert.pem"), "{err}");
    }
}
