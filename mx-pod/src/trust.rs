//! What outbound TLS trusts, and the TLS client settings of every connection mx-pod and the
//! operator open: HTTPS (rspamd, DNS provider APIs, webhooks) and SMTP (replay to the primaries,
//! DSNs to a relay or the sender's MX, the health probe).
//!
//! Trust anchors are the Mozilla roots compiled in (webpki-roots: a distroless image has no
//! system bundle, and a pod must not depend on one) plus an optional PEM bundle for a private
//! PKI. HTTPS always verifies the certificate chain and the host name: there is no switch to turn
//! that off. SMTP follows a [`TlsPolicy`], like Postfix's `smtp_tls_security_level`.
//!
//! The crypto provider is ring everywhere (reqwest is built with `rustls-no-provider`, and the
//! rustls configs here name ring explicitly), so no process-wide default has to be installed.

use std::{fmt, path::Path, sync::Arc};

use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
};
use serde::{Deserialize, Serialize};

/// How SMTP to a primary or a DSN relay uses TLS (Postfix's `smtp_tls_security_level`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never STARTTLS, even when offered.
    None,
    /// STARTTLS whenever the server offers it, certificate not checked (the MTA default). A
    /// failed handshake is retried once in plaintext on a new connection, as Postfix does.
    #[default]
    May,
    /// STARTTLS required: a server that does not offer it, or whose handshake fails, gets no
    /// mail (deferred); the certificate is not checked.
    Encrypt,
    /// STARTTLS required and the certificate verified: chain to a trusted root (webpki roots or
    /// the CA bundle) and the configured host name.
    Verify,
}

impl TlsPolicy {
    /// Whether mail may go out without TLS under this policy.
    pub fn allows_plaintext(self) -> bool {
        matches!(self, TlsPolicy::None | TlsPolicy::May)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TlsPolicy::None => "none",
            TlsPolicy::May => "may",
            TlsPolicy::Encrypt => "encrypt",
            TlsPolicy::Verify => "verify",
        }
    }
}

impl fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A trust error: the CA bundle cannot be read or holds no certificate.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TrustError(pub String);

/// The trust anchors outbound TLS verifies against; cheap to clone.
#[derive(Clone)]
pub struct Trust {
    roots: Arc<RootCertStore>,
    /// Certificates added from the CA bundle (0 without one).
    pub extra: usize,
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Trust({} roots, {} from the CA bundle)",
            self.roots.len(),
            self.extra
        )
    }
}

impl Default for Trust {
    fn default() -> Self {
        Self::webpki()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Trust {
    /// The Mozilla roots alone.
    pub fn webpki() -> Trust {
        Trust {
            roots: Arc::new(RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            }),
            extra: 0,
        }
    }

    /// The Mozilla roots plus every certificate of the PEM bundle `pem`; `origin` names the
    /// bundle in errors. A bundle without a usable certificate is an error, never ignored.
    pub fn with_pem(pem: &[u8], origin: &str) -> Result<Trust, TrustError> {
        let mut trust = Self::webpki();
        let store = Arc::make_mut(&mut trust.roots);
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| TrustError(format!("{origin}: bad PEM: {e}")))?;
            store
                .add(cert)
                .map_err(|e| TrustError(format!("{origin}: not a usable CA certificate: {e}")))?;
            trust.extra += 1;
        }
        if trust.extra == 0 {
            return Err(TrustError(format!(
                "{origin}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it"
            )));
        }
        Ok(trust)
    }

    /// The Mozilla roots plus the PEM bundle in `file`, when given.
    pub fn load(file: Option<&Path>) -> Result<Trust, TrustError> {
        match file {
            None => Ok(Self::webpki()),
            Some(f) => {
                let pem = std::fs::read(f)
                    .map_err(|e| TrustError(format!("cannot read {}: {e}", f.display())))?;
                Self::with_pem(&pem, &f.display().to_string())
            }
        }
    }

    /// A rustls client config that verifies the chain and the host name against these roots.
    pub fn verifying_config(&self) -> ClientConfig {
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth()
    }

    /// An HTTP client builder that speaks HTTPS with these roots (always verified); HTTP/1.1.
    pub fn https(&self) -> reqwest::ClientBuilder {
        let mut tls = self.verifying_config();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        reqwest::Client::builder().tls_backend_preconfigured(tls)
    }

    /// An HTTP client with these roots and reqwest's defaults.
    pub fn client(&self) -> reqwest::Client {
        self.https()
            .build()
            .expect("an HTTP client with a preconfigured TLS config builds")
    }

    /// The TLS connector for SMTP under `policy`: `verify` checks the chain and the host name,
    /// the other policies accept any certificate but still check the handshake's signatures.
    pub fn smtp_connector(&self, policy: TlsPolicy) -> tokio_rustls::TlsConnector {
        let config = if policy == TlsPolicy::Verify {
            self.verifying_config()
        } else {
            let provider = provider();
            ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
                .with_no_client_auth()
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// A verifier against these roots (for callers that check a certificate themselves).
    pub fn verifier(&self) -> Result<Arc<WebPkiServerVerifier>, TrustError> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TrustError(format!("certificate verifier: {e}")))
    }
}

/// The TLS server name of `host:port` (a DNS name or an IP address, `[v6]` brackets removed).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TrustError> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| TrustError(format!("TLS server name {host:?}: {e}")))
}

/// An error with its causes, `a: b: c`. reqwest and rustls put what a person must act on (an
/// unknown issuer, a name mismatch) in the source chain, not in the top error's text.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// Whether `e` failed because of TLS: a `rustls::Error` (an unknown issuer, a name mismatch, an
/// expired certificate, a failed handshake) somewhere in its source chain. Needed because a
/// refused certificate and a refused connection look alike at the top of a reqwest error, yet
/// call for different fixes (a CA bundle vs. a network path).
pub fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if err.is::<rustls::Error>() {
            return true;
        }
        // `io::Error::source` skips the error it wraps (it returns that error's source), and
        // tokio-rustls hands rustls errors over wrapped in an `io::Error`: look inside
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            && is_tls_error(inner)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Accepts any certificate (opportunistic TLS between MTAs, Postfix `may`/`encrypt`) but checks
/// the handshake's signatures with the crypto provider, so a broken TLS stack still fails.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
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

    #[test]
    fn bundle_adds_its_certificates_to_the_webpki_roots() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let base = Trust::webpki().roots.len();
        assert!(base > 100, "the Mozilla roots are compiled in");
        let t = Trust::with_pem(ca.cert.pem().as_bytes(), "ca.pem").unwrap();
        assert_eq!(t.extra, 1);
        assert_eq!(t.roots.len(), base + 1);
    }

    #[test]
    fn a_bundle_without_certificates_is_an_error() {
        let e = Trust::with_pem(b"not a pem\n", "ca.pem").unwrap_err();
        assert!(
            e.0.contains("ca.pem") && e.0.contains("no PEM certificate"),
            "{e}"
        );
        let e = Trust::load(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(e.0.contains("cannot read /nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors_and_source_chains() {
        #[derive(Debug, thiserror::Error)]
        #[error("connect")]
        struct Outer(#[source] std::io::Error);
        let cert = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let wrapped = Outer(std::io::Error::new(std::io::ErrorKind::InvalidData, cert));
        assert!(is_tls_error(&wrapped));
        assert!(
            error_chain(&wrapped).contains("UnknownIssuer"),
            "{}",
            error_chain(&wrapped)
        );
        let refused = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_tls_error(&refused));
        let other = Outer(std::io::Error::other("not TLS"));
        assert!(!is_tls_error(&other));
    }

    #[test]
    fn policy_words() {
        for p in [
            TlsPolicy::None,
            TlsPolicy::May,
            TlsPolicy::Encrypt,
            TlsPolicy::Verify,
        ] {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{p}\""));
        }
        assert!(TlsPolicy::May.allows_plaintext() && !TlsPolicy::Encrypt.allows_plaintext());
        assert_eq!(TlsPolicy::default(), TlsPolicy::May);
    }
}
