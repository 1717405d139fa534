//! The SMTP health probe of a primary: connect, `220` greeting, `EHLO`, optionally `STARTTLS`
//! and a TLS handshake with `EHLO` again, then `QUIT`. Shared by mx-pod's standalone
//! `replay.auto` mode and the operator's health checks, so both judge a primary the same way. A
//! greeting other than `220` (a `421` or `554` "go away") is a failure.
//!
//! The TLS part follows the delivery's [`TlsPolicy`]: a policy that allows no plaintext
//! (`encrypt`, `verify`) makes STARTTLS part of health, since replay could not deliver without
//! it; `verify` also checks the certificate chain and host name, as delivery will. Under `none`
//! and `may` the certificate is not verified, as MTAs do between themselves (self-signed and
//! private-CA certificates are the norm for a primary), but the handshake itself is checked
//! (signatures, TLS 1.2+), so a primary whose TLS is broken is unhealthy when STARTTLS is asked for.

use std::time::{Duration, Instant};

use crate::{
    outbound::{Capabilities, ClientError, SmtpClient, Stage, TlsFailure},
    trust::{TlsPolicy, Trust, server_name},
};

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

/// How the probe uses TLS.
#[derive(Debug, Clone, Copy)]
pub struct ProbeTls<'a> {
    /// Require STARTTLS and a handshake even when the policy allows plaintext
    /// (`healthCheck.startTls`).
    pub starttls: bool,
    /// The delivery policy towards this primary.
    pub policy: TlsPolicy,
    /// Trust anchors for `verify`.
    pub trust: &'a Trust,
}

impl ProbeTls<'_> {
    /// Whether this probe says STARTTLS.
    pub fn required(&self) -> bool {
        self.starttls || !self.policy.allows_plaintext()
    }
}

/// Probes `addr` (`host:port`), saying `helo`; the whole exchange must end within `timeout`.
pub async fn probe(addr: &str, helo: &str, timeout: Duration) -> Result<ProbeReport, ClientError> {
    let trust = Trust::webpki();
    let tls = ProbeTls {
        starttls: false,
        policy: TlsPolicy::None,
        trust: &trust,
    };
    probe_with(addr, helo, timeout, tls).await
}

/// Like [`probe`], with STARTTLS when `tls` requires it: the primary must then offer
/// `STARTTLS`, complete a TLS handshake (verified under `verify`) and answer `EHLO` inside TLS.
pub async fn probe_with(
    addr: &str,
    helo: &str,
    timeout: Duration,
    tls: ProbeTls<'_>,
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
        if tls.required() {
            if !client.caps.starttls {
                client.quit().await;
                return Err(ClientError::Tls {
                    failure: TlsFailure::NotOffered,
                    detail: format!(
                        "STARTTLS is not offered in the EHLO reply of {addr} (tls policy {}{})",
                        tls.policy,
                        if tls.starttls {
                            ", healthCheck.startTls"
                        } else {
                            ""
                        }
                    ),
                });
            }
            // `none` with startTls asks for a working handshake, not for a checked certificate
            let policy = match tls.policy {
                TlsPolicy::Verify => TlsPolicy::Verify,
                _ => TlsPolicy::Encrypt,
            };
            let name = server_name(addr).map_err(|e| ClientError::Protocol(e.0))?;
            let (session, negotiated) = client
                .starttls(&tls.trust.smtp_connector(policy), name, helo)
                .await?;
            session.quit().await;
            report.tls = Some(negotiated);
        } else {
            client.quit().await;
        }
        report.elapsed = started.elapsed();
        Ok(report)
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or(Err(ClientError::Timeout {
            stage: Stage::Probe,
            after: timeout,
        }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::outbound::script::{Answer, Script, scripted, send};
    use rustls::pki_types::CertificateDer;
    use tokio::{
        io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
        net::TcpListener,
    };

    /// `healthCheck.startTls` under policy `may`.
    async fn starttls_probe(addr: &str) -> Result<ProbeReport, ClientError> {
        let trust = Trust::webpki();
        let tls = ProbeTls {
            starttls: true,
            policy: TlsPolicy::May,
            trust: &trust,
        };
        probe_with(addr, "mx2.test", Duration::from_secs(5), tls).await
    }

    /// A scripted server: greets with `greeting`, offers STARTTLS but answers it `221`.
    async fn server(greeting: &'static str) -> String {
        let (addr, _) = scripted(Script {
            greeting: send(greeting.as_bytes()),
            ehlo: send(b"250-primary.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n"),
            starttls: send(b"221 bye\r\n"),
            ..Script::default()
        })
        .await;
        addr
    }

    /// A scripted server offering STARTTLS that answers it with `answer`, and no TLS.
    async fn starttls_server(answer: Answer) -> String {
        let (addr, _) = scripted(Script {
            ehlo: send(b"250-p.test\r\n250 STARTTLS\r\n"),
            starttls: answer,
            ..Script::default()
        })
        .await;
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

    /// A server offering STARTTLS that completes TLS with a self-signed certificate and
    /// answers EHLO inside. Also returns the certificate (PEM, for `primary.test` and
    /// `127.0.0.1`).
    async fn tls_server() -> (String, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let ck = rcgen::generate_simple_self_signed(vec![
            "primary.test".to_string(),
            "127.0.0.1".to_string(),
        ])
        .unwrap();
        let pem = ck.cert.pem();
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
        (addr, pem)
    }

    /// RFC 3207 §5 / CVE-2011-0411: a reply smuggled in the same packet as the 220 to
    /// STARTTLS would be read as if it came inside TLS; the client refuses the session.
    #[tokio::test]
    async fn starttls_refuses_data_sent_with_the_220() {
        let addr = starttls_server(send(b"220 2.0.0 go ahead\r\n250 2.0.0 injected\r\n")).await;
        let err = starttls_probe(&addr).await.unwrap_err();
        assert!(err.to_string().contains("plaintext injection"), "{err}");
    }

    #[tokio::test]
    async fn starttls_probe_completes_the_handshake_and_ehlo_inside_tls() {
        let (addr, _) = tls_server().await;
        let r = starttls_probe(&addr).await.unwrap();
        let tls = r.tls.expect("TLS details");
        assert!(tls.starts_with("TLSv1_3"), "{tls}");
    }

    #[tokio::test]
    async fn policy_verify_checks_the_certificate_against_the_trusted_roots() {
        let verify = |trust: Trust, addr: String| async move {
            let tls = ProbeTls {
                starttls: false,
                policy: TlsPolicy::Verify,
                trust: &trust,
            };
            probe_with(&addr, "mx2.test", Duration::from_secs(5), tls).await
        };
        // unknown issuer: refused as a certificate failure
        let (addr, _) = tls_server().await;
        let err = verify(Trust::webpki(), addr).await.unwrap_err();
        assert_eq!(err.tls_failure(), Some(TlsFailure::Certificate), "{err}");
        assert!(err.to_string().contains("certificate rejected"), "{err}");
        // the same kind of server, its certificate trusted through the CA bundle: healthy
        let (addr, pem) = tls_server().await;
        let trust = Trust::with_pem(pem.as_bytes(), "test bundle").unwrap();
        let r = verify(trust, addr).await.unwrap();
        assert!(r.tls.is_some());
        // a policy without plaintext asks for STARTTLS even without healthCheck.startTls
        let addr = server("220 primary.test ESMTP\r\n").await;
        let trust = Trust::webpki();
        let tls = ProbeTls {
            starttls: false,
            policy: TlsPolicy::Encrypt,
            trust: &trust,
        };
        let err = probe_with(&addr, "mx2.test", Duration::from_secs(5), tls)
            .await
            .unwrap_err();
        assert_eq!(err.tls_failure(), Some(TlsFailure::Refused), "{err}");
    }

    #[tokio::test]
    async fn starttls_probe_fails_on_a_broken_handshake_or_when_not_offered() {
        // a broken TLS stack: 220, then the server hangs up
        let addr = starttls_server(Answer::Last(b"220 2.0.0 go ahead\r\n".to_vec())).await;
        let err = starttls_probe(&addr).await.unwrap_err();
        assert!(err.to_string().contains("TLS handshake failed"), "{err}");
        let addr = server("220 primary.test ESMTP\r\n").await; // offers STARTTLS, answers 221
        let err = starttls_probe(&addr).await.unwrap_err();
        assert!(err.to_string().contains("STARTTLS answered 221"), "{err}");
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
