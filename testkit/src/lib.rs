//! Test-only TLS fixtures, so every test speaks TLS where production does: a certificate
//! authority made at test time ([`TestCa`]), certificates it issues for loopback names, HTTPS
//! servers for the fakes of services that cannot run here ([`serve_https`]: Cloudflare,
//! Route53, webhooks), and a TLS front for real components that only speak plain HTTP on
//! loopback ([`TlsFront`]: rspamd, the PowerDNS API), as a reverse proxy would in production.
//!
//! Nothing here is used outside tests: clients under test verify these certificates like any
//! other, through the CA bundle the test hands them.

use std::{io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A server certificate (with its chain) and key, in PEM.
#[derive(Clone)]
pub struct Leaf {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The issuing CA, PEM (what a client must trust).
    pub ca_pem: String,
}

impl TestCa {
    /// A new CA named `name` (e.g. "backupmx test CA").
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        TestCa {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `path` (a CA bundle file).
    pub fn write_pem(&self, path: &Path) {
        std::fs::write(path, self.pem()).expect("write the CA bundle");
    }

    /// A server certificate for `names` (DNS names or IP addresses, e.g. `127.0.0.1`).
    pub fn issue(&self, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &*self.issuer)
            .expect("leaf certificate");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.pem(),
        }
    }
}

impl Leaf {
    /// Writes `cert.pem` (leaf then CA) and `key.pem` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, format!("{}{}", self.cert_pem, self.ca_pem)).expect("write cert");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (cert, key)
    }

    /// A rustls server config presenting this certificate (HTTP/1.1).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(format!("{}{}", self.cert_pem, self.ca_pem).as_bytes())
                .collect::<Result<_, _>>()
                .expect("leaf PEM");
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("key PEM");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server certificate");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A TLS listener for `axum::serve`: handshakes one connection at a time (bounded by a
/// timeout); failed handshakes (a client that does not trust the CA) are dropped and counted.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    failed: Arc<std::sync::atomic::AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            let handshake =
                tokio::time::timeout(Duration::from_secs(10), self.acceptor.accept(tcp));
            match handshake.await {
                Ok(Ok(tls)) => return (tls, addr),
                _ => {
                    self.failed
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// A running HTTPS server.
pub struct Https {
    /// `https://127.0.0.1:PORT` (no trailing slash).
    pub url: String,
    pub addr: SocketAddr,
    failed: Arc<std::sync::atomic::AtomicUsize>,
}

impl Https {
    /// Handshakes that failed so far (e.g. a client that refused the certificate).
    pub fn failed_handshakes(&self) -> usize {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Serves `app` over HTTPS on a free port of 127.0.0.1 with `leaf` (issue it for `127.0.0.1`),
/// until the test's runtime ends.
pub async fn serve_https(app: axum::Router, leaf: &Leaf) -> Https {
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = tcp.local_addr().expect("address");
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(leaf.server_config()),
        failed: failed.clone(),
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    Https {
        url: format!("https://{addr}"),
        addr,
        failed,
    }
}

/// A TLS-terminating front for a plain-TCP backend on loopback (rspamd, the PowerDNS API): what
/// a reverse proxy or a TLS sidecar does in production. Runs until the test's runtime ends.
pub struct TlsFront {
    /// Where clients connect (TLS).
    pub addr: SocketAddr,
}

impl TlsFront {
    /// Starts a front on a free port of 127.0.0.1 that forwards to `backend`.
    pub async fn start(backend: SocketAddr, leaf: &Leaf) -> TlsFront {
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("address");
        let acceptor = TlsAcceptor::from(leaf.server_config());
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = tcp.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut upstream) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        TlsFront { addr }
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_client_trusting_the_ca_completes_the_handshake_and_others_do_not() {
        let ca = TestCa::new("testkit CA");
        let leaf = ca.issue(&["127.0.0.1", "localhost"]);
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let server = serve_https(app, &leaf).await;
        let connect = |roots: rustls::RootCertStore| async move {
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect("127.0.0.1".try_into().unwrap(), tcp)
                .await
        };
        let mut trusted = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.pem().as_bytes()) {
            trusted.add(c.unwrap()).unwrap();
        }
        connect(trusted).await.expect("trusted CA");
        let other = TestCa::new("another CA");
        let mut untrusted = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(other.pem().as_bytes()) {
            untrusted.add(c.unwrap()).unwrap();
        }
        assert!(connect(untrusted).await.is_err(), "unknown CA refused");
    }
}
