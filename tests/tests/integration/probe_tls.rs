//! The primary's health probe with STARTTLS (`healthCheck.startTls`) against a real Postfix:
//! with TLS configured the probe completes the handshake and EHLO inside TLS; without it, or
//! with a broken certificate, the primary counts as unhealthy.

use std::{process::Command, time::Duration};

use backupmx_tests::Primary;
use mx_pod::{
    outbound::ClientError,
    probe::{ProbeTls, probe, probe_with},
    trust::{TlsPolicy, Trust},
};

/// `healthCheck.startTls` under the default policy `may`.
async fn starttls_probe(addr: &str) -> Result<mx_pod::probe::ProbeReport, ClientError> {
    let trust = Trust::webpki();
    let tls = ProbeTls {
        starttls: true,
        policy: TlsPolicy::May,
        trust: &trust,
    };
    probe_with(addr, "mx2.example.test", Duration::from_secs(5), tls).await
}

/// Turns on `smtpd_tls_security_level = may` with a fresh self-signed certificate (or a
/// certificate file that does not parse, when `broken`) and reloads Postfix.
fn enable_tls(primary: &Primary, broken: bool) {
    let etc = primary.dir.path().join("etc");
    let cert = etc.join("tls.crt");
    let key = etc.join("tls.key");
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=primary.example.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if broken {
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot a certificate\n").unwrap();
    }
    primary.reconfigure(&[
        "smtpd_tls_security_level=may".into(),
        format!("smtpd_tls_cert_file={}", cert.display()),
        format!("smtpd_tls_key_file={}", key.display()),
    ]);
}

/// Probes until `ok` holds for the result (a reload takes effect for new smtpd processes).
async fn probe_until(
    addr: &str,
    what: &str,
    ok: impl Fn(&Result<mx_pod::probe::ProbeReport, ClientError>) -> bool,
) -> Result<mx_pod::probe::ProbeReport, ClientError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = starttls_probe(addr).await;
        if ok(&r) || std::time::Instant::now() > deadline {
            assert!(ok(&r), "{what}: {r:?}");
            return r;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn starttls_probe_needs_a_working_tls_handshake_on_the_real_primary() {
    let primary = Primary::start();
    let addr = primary.addr();
    // plain Postfix (smtpd_tls_security_level = none): healthy without TLS, not with
    let plain = probe(&addr, "mx2.example.test", Duration::from_secs(5))
        .await
        .expect("plain probe");
    assert!(!plain.capabilities.starttls);
    assert!(plain.tls.is_none());
    let err = starttls_probe(&addr).await.unwrap_err();
    assert!(err.to_string().contains("STARTTLS is not offered"), "{err}");

    // TLS on: handshake, EHLO inside TLS, the negotiated protocol reported
    enable_tls(&primary, false);
    let report = probe_until(&addr, "a TLS probe to succeed", |r| r.is_ok())
        .await
        .unwrap();
    let tls = report.tls.expect("TLS details");
    assert!(
        tls.starts_with("TLSv1_3") || tls.starts_with("TLSv1_2"),
        "{tls}"
    );

    // a certificate Postfix cannot load: it may still advertise STARTTLS, but no handshake
    enable_tls(&primary, true);
    let err = probe_until(&addr, "a TLS probe to fail", |r| r.is_err())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("STARTTLS") || text.contains("TLS"),
        "a precise error: {text}"
    );
}
