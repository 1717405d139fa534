//! The SMTP health probe of a primary: connect, `220` greeting, `EHLO`, optionally `STARTTLS`
//! and a TLS handshake with `EHLO` again, then `QUIT`. Shared by mx-pod's standalone
//! `replay.auto` mode and the operator's health checks, so both judge a primary the same way. A
//! greeting other than `220` (a `421` or `554` "go away") is a failure.
//!
//! With STARTTLS the certificate is not verified, as MTAs do between themselves by default
//! (Postfix `smtp_tls_security_level = may`: self-signed and private-CA certificates are the
//! norm for a primary). The handshake itself is checked (signatures, TLS 1.2+), so a primary
//! whose TLS is broken (no certificate, expired key, refused handshake) is unhealthy.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use crate::replay::client::{Capabilities, ClientError, SmtpClient};

/// What a successful probe saw.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// The greeting text (first line).
    pub banner: String,
    pub capabilities: Capabilities,
    pub elapsed: Duration,
    /// With STARTTLS: the negotiated protocol and cipher suite (`TLSv1_3 TLS13_AES_256_GCM_SHA384`).
    pub tls: Option<String>,
}

/// Probes `addr` (`host:port`), saying `helo`; the whole exchange must end within `timeout`.
pub async fn probe(addr: &str, helo: &str, timeout: Duration) -> Result<ProbeReport, ClientError> {
    probe_with(addr, helo, timeout, false).await
}

/// Like [`probe`]; with `starttls` the primary must also offer `STARTTLS`, complete a TLS
/// handshake and answer `EHLO` inside TLS.
pub async fn probe_with(
    addr: &str,
    helo: &str,
    timeout: Duration,
    starttls: bool,
) -> Result<ProbeReport, ClientError> {
    let started = Instant::now();
    let run = async {
        let client = SmtpClient::connect(addr, helo, timeout).await?;
        let mut report = ProbeReport {
            banner: client.greeting.lines.first().cloned().unwrap_or_default(),
            capabilities: client.caps.clone(),
            elapsed: Duration::ZERO,
            tls: None,
        };
        if starttls {
            if !client.caps.starttls {
                client.quit().await;
                return Err(ClientError::Protocol(
                    "STARTTLS is not offered in the EHLO reply".into(),
                ));
            }
            let (tls, negotiated) = client
                .starttls(&opportunistic_tls()?, server_name(addr)?, helo)
                .await?;
            tls.quit().await;
            report.tls = Some(negotiated);
        } else {
            client.quit().await;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(ClientError::Timeout("the whole probe")))
}

/// A TLS connector for opportunistic TLS towards the primary (see [`OpportunisticTls`]).
fn opportunistic_tls() -> Result<tokio_rustls::TlsConnector, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Protocol(format!("TLS set-up: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(OpportunisticTls(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The TLS server name of `host:port` (a DNS name or an IP address).
fn server_name(addr: &str) -> Result<ServerName<'static>, ClientError> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| ClientError::Protocol(format!("TLS server name {host:?}: {e}")))
}

/// Accepts any certificate (opportunistic TLS between MTAs) but checks the handshake's
/// signatures with the crypto provider.
#[derive(Debug)]
struct OpportunisticTls(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for OpportunisticTls {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        net::TcpListener,
    };

    /// A scripted server: greets with `greeting`, answers EHLO and QUIT.
    async fn server(greeting: &'static str) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            w.write_all(greeting.as_bytes()).await.unwrap();
            let mut r = BufReader::new(r);
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                let reply: &[u8] = if line.starts_with("EHLO") {
                    b"250-primary.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"
                } else {
                    b"221 bye\r\n"
                };
                let _ = w.write_all(reply).await;
                line.clear();
            }
        });
        addr
    }

    #[tokio::test]
    async fn healthy_primary_reports_banner_and_features() {
        let addr = server("220 primary.test ESMTP\r\n").await;
        let r = probe(&addr, "mx2.test", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(r.banner, "primary.test ESMTP");
        assert!(r.capabilities.pipelining && r.capabilities.starttls);
    }

    #[tokio::test]
    async fn busy_greeting_is_unhealthy() {
        let addr = server("421 4.3.2 busy\r\n").await;
        let err = probe(&addr, "mx2.test", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.is_throttle(), "{err}");
        let addr = server("554 5.3.2 no service\r\n").await;
        assert!(
            probe(&addr, "mx2.test", Duration::from_secs(5))
                .await
                .is_err()
        );
    }

    /// A server offering STARTTLS: `handshake` false answers 220 and then closes (a broken TLS
    /// stack); true completes TLS with a self-signed certificate and answers EHLO inside.
    async fn tls_server(handshake: bool) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let ck = rcgen::generate_simple_self_signed(vec!["primary.test".to_string()]).unwrap();
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key =
            rustls::pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = BufReader::new(s);
            r.get_mut()
                .write_all(b"220 primary.test ESMTP\r\n")
                .await
                .unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                if line.starts_with("EHLO") {
                    r.get_mut()
                        .write_all(b"250-primary.test\r\n250 STARTTLS\r\n")
                        .await
                        .unwrap();
                } else if line.starts_with("STARTTLS") {
                    r.get_mut()
                        .write_all(b"220 2.0.0 go ahead\r\n")
                        .await
                        .unwrap();
                    if !handshake {
                        return;
                    }
                    let tls = acceptor.accept(r.into_inner()).await.unwrap();
                    let mut t = BufReader::new(tls);
                    let mut l2 = String::new();
                    while t.read_line(&mut l2).await.unwrap_or(0) > 0 {
                        let reply: &[u8] = if l2.starts_with("EHLO") {
                            b"250-primary.test\r\n250 PIPELINING\r\n"
                        } else {
                            b"221 bye\r\n"
                        };
                        let _ = t.get_mut().write_all(reply).await;
                        let _ = t.get_mut().flush().await;
                        l2.clear();
                    }
                    return;
                } else {
                    let _ = r.get_mut().write_all(b"221 bye\r\n").await;
                }
                line.clear();
            }
        });
        addr
    }

    /// RFC 3207 §5 / CVE-2011-0411: a reply smuggled in the same packet as the 220 to
    /// STARTTLS would be read as if it came inside TLS; the client refuses the session.
    #[tokio::test]
    async fn starttls_refuses_data_sent_with_the_220() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut r = BufReader::new(s);
            r.get_mut()
                .write_all(b"220 p.test ESMTP\r\n")
                .await
                .unwrap();
            let mut line = String::new();
            while r.read_line(&mut line).await.unwrap_or(0) > 0 {
                let reply: &[u8] = if line.starts_with("EHLO") {
                    b"250-p.test\r\n250 STARTTLS\r\n"
                } else {
                    b"220 2.0.0 go ahead\r\n250 2.0.0 injected\r\n"
                };
                r.get_mut().write_all(reply).await.unwrap();
                line.clear();
            }
        });
        let err = probe_with(&addr, "mx2.test", Duration::from_secs(5), true)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("plaintext injection"), "{err}");
    }

    #[tokio::test]
    async fn starttls_probe_completes_the_handshake_and_ehlo_inside_tls() {
        let addr = tls_server(true).await;
        let r = probe_with(&addr, "mx2.test", Duration::from_secs(5), true)
            .await
            .unwrap();
        let tls = r.tls.expect("TLS details");
        assert!(tls.starts_with("TLSv1_3"), "{tls}");
    }

    #[tokio::test]
    async fn starttls_probe_fails_on_a_broken_handshake_or_when_not_offered() {
        let addr = tls_server(false).await;
        let err = probe_with(&addr, "mx2.test", Duration::from_secs(5), true)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("TLS handshake"), "{err}");
        let addr = server("220 primary.test ESMTP\r\n").await; // offers STARTTLS, answers 221
        let err = probe_with(&addr, "mx2.test", Duration::from_secs(5), true)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("STARTTLS refused"), "{err}");
        // without starttls the same kind of server is healthy
        let addr = server("220 primary.test ESMTP\r\n").await;
        assert!(
            probe(&addr, "mx2.test", Duration::from_secs(5))
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn closed_port_is_unhealthy() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        drop(l);
        let err = probe(&addr, "mx2.test", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
