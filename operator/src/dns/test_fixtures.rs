//! What the HTTP providers' tests ([`super::cloudflare`], [`super::route53`]) share: the records
//! they write, the trust of their clients, and the failures they provoke and check.

use std::net::SocketAddr;

use mx_pod::trust::Trust;
use testkit::{Leaf, TestCa};

use super::{Changes, DnsError, DnsErrorKind, DnsProvider, RData, Record};

pub fn mx(name: &str, prio: u16, host: &str, ttl: u32) -> Record {
    Record::new(name, ttl, RData::Mx(prio, host.into()))
}

/// The trust of a client that knows `ca` (the Mozilla roots and it, as `spec.caBundle`).
pub fn trusting(ca: &TestCa) -> Trust {
    Trust::with_pem(ca.pem().as_bytes(), "test CA").unwrap()
}

/// How `provider` fails to add the backup's MX (priority 20) at example.com's apex.
pub async fn add_backup_mx_error(provider: &dyn DnsProvider) -> DnsError {
    provider
        .apply(
            "example.com",
            &Changes {
                add: vec![mx("example.com", 20, "mx2.example.com", 300)],
                remove: vec![],
            },
        )
        .await
        .unwrap_err()
}

/// How `provider` fails to read example.com's apex.
pub async fn apex_error(provider: &dyn DnsProvider) -> DnsError {
    provider
        .records("example.com", "example.com")
        .await
        .unwrap_err()
}

/// A local address where nothing listens (for [`assert_refused`]) (a port bound, then let go).
pub async fn closed_port() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// Asserts that `e` is the failure to connect to [`closed_port`].
pub fn assert_refused(e: &DnsError) {
    assert_eq!(e.kind, DnsErrorKind::Unreachable);
    assert!(e.message.contains("Connection refused"), "{e}");
}

/// A certificate for the fakes' addresses from a CA the client does not know, and the CA it
/// does know (its `spec.caBundle`).
pub fn unknown_issuer_leaf() -> (Leaf, TestCa) {
    let known = TestCa::new("the CA in spec.caBundle");
    let unknown = TestCa::new("another CA");
    (unknown.issue(&["127.0.0.1", "localhost"]), known)
}

/// Asserts that `e` is the TLS failure of an API whose certificate comes from a CA the client
/// does not trust.
pub fn assert_unknown_issuer(e: &DnsError) {
    assert_eq!(e.kind, DnsErrorKind::Tls, "{e}");
    assert_eq!(e.kind.reason(), "ProviderTlsFailed");
    assert!(
        e.message
            .contains("invalid peer certificate: UnknownIssuer"),
        "{e}"
    );
}
