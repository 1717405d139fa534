//! TLS towards the primary and the DSN relay, against a real Postfix whose certificate comes
//! from a CA made at test time. `verify` delivers to a primary that refuses plaintext
//! (`smtpd_tls_security_level = encrypt`) in order, and DSNs go over TLS too; a certificate from
//! a CA mx-pod does not trust is refused; `encrypt` never sends in plaintext to a primary
//! without STARTTLS (the mail stays queued, and the reason is in the log, `GET /v1/replay` and
//! the metrics) and delivers once the primary offers TLS; `may` takes TLS when offered.

use std::time::Duration;

use backupmx_tests::{MxPod, MxPodConfig, Primary, message, send, send_all, wait_for, with_tag};
use testkit::TestCa;

const DELIVERED_TLS: &str = "mxpod_delivered_messages_total{domain=\"example.test\",tls=\"yes\"}";
const DELIVERED_PLAIN: &str = "mxpod_delivered_messages_total{domain=\"example.test\",tls=\"no\"}";

fn failures(reason: &str) -> String {
    format!("mxpod_tls_failures_total{{domain=\"example.test\",reason=\"{reason}\"}}")
}

/// A primary with STARTTLS at `level`, its certificate for 127.0.0.1 issued by `ca`.
async fn tls_primary(ca: &TestCa, level: &str) -> Primary {
    let primary = Primary::start();
    let (cert, key) = ca
        .issue(&["127.0.0.1", "localhost"])
        .write(&primary.dir.path().join("etc"));
    primary.enable_tls(&cert, &key, level).await;
    primary
}

/// An mx-pod for `primary` under `policy`, trusting `ca` when given; replay held.
async fn mxpod(primary: &Primary, policy: &str, ca: Option<&TestCa>) -> MxPod {
    let dir = backupmx_tests::state_dir("mxpod");
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.domain_extra = format!("tls_policy = \"{policy}\"\n");
    if let Some(ca) = ca {
        let file = dir.path().join("ca.pem");
        ca.write_pem(&file);
        cfg.extra = format!("[trust]\nca_file = \"{}\"\n", file.display());
    }
    MxPod::start_in(dir, cfg).await
}

async fn queue(pod: &MxPod, tag: &str, n: usize) {
    send_all(pod.smtp, "alice@example.test", tag, 0..n, 800).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_delivers_in_order_to_a_primary_that_requires_tls_and_dsns_go_over_tls() {
    let ca = TestCa::new("backupmx test CA");
    let primary = tls_primary(&ca, "encrypt").await;
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.domain_extra = "tls_policy = \"verify\"\n".into();
    // DSNs through the same Postfix (it takes mail for example.test, the sender's domain)
    cfg.dsn_relay = Some(primary.addr());
    cfg.dsn_extra = "tls_policy = \"verify\"\n".into();
    let dir = backupmx_tests::state_dir("mxpod");
    let file = dir.path().join("ca.pem");
    ca.write_pem(&file);
    cfg.extra = format!("[trust]\nca_file = \"{}\"\n", file.display());
    let pod = MxPod::start_in(dir, cfg).await;

    queue(&pod, "tls", 12).await;
    // one more the primary refuses with 550: its DSN goes to alice@example.test via the relay
    let r = send(
        pod.smtp,
        "alice@example.test",
        &["reject5@example.test"],
        &message("bounce", 0, 300),
    )
    .await
    .unwrap();
    assert!(r.ok(), "{r:?}");
    pod.set_replay(3, 0).await;
    pod.wait_empty(Duration::from_secs(60)).await;

    let order = with_tag(&primary.received_order(), "tls");
    let expected: Vec<String> = (0..12).map(|i| format!("tls.{i}@test")).collect();
    assert_eq!(order, expected, "every message once, in order");
    assert_eq!(pod.metric(DELIVERED_TLS).await, 12.0);
    assert_eq!(pod.metric(DELIVERED_PLAIN).await, 0.0);
    assert_eq!(
        pod.metric("mxpod_delivered_messages_total{domain=\"_dsn\",tls=\"yes\"}")
            .await,
        1.0,
        "the DSN went over TLS"
    );
    let dsn = primary
        .delivered()
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m).into_owned())
        .find(|m| m.contains("multipart/report"))
        .expect("the DSN reached the relay");
    assert!(dsn.contains("reject5@example.test"), "{dsn}");
    let log = primary.maillog();
    assert!(
        log.contains("TLS connection established from"),
        "Postfix logged TLS sessions:\n{log}"
    );
    assert!(
        !log.contains("Must issue a STARTTLS command first"),
        "nothing was tried in plaintext:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_a_certificate_from_an_unknown_ca() {
    let ca = TestCa::new("the primary's CA");
    let primary = tls_primary(&ca, "may").await;
    // mx-pod trusts another CA (and the public roots): the primary's certificate is unknown
    let other = TestCa::new("some other CA");
    let pod = mxpod(&primary, "verify", Some(&other)).await;
    queue(&pod, "unknown-ca", 2).await;
    pod.set_replay(1, 0).await;
    wait_for("a certificate failure", Duration::from_secs(30), || async {
        pod.metric(&failures("certificate")).await >= 1.0
    })
    .await;
    let route = pod.route("example.test").await;
    let error = route["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("certificate rejected") && error.contains("UnknownIssuer"),
        "{route}"
    );
    assert_eq!(route["tls_policy"], "verify");
    assert_eq!(pod.queued().await, 2, "the mail stays queued");
    assert!(primary.delivered().is_empty(), "nothing delivered");
    assert!(
        pod.log_text().contains("certificate rejected"),
        "{}",
        pod.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypt_never_sends_in_plaintext_and_delivers_once_the_primary_offers_tls() {
    let primary = Primary::start(); // no TLS
    let pod = mxpod(&primary, "encrypt", None).await;
    queue(&pod, "encrypt", 4).await;
    pod.set_replay(2, 0).await;
    wait_for(
        "the route to fail for lack of STARTTLS",
        Duration::from_secs(30),
        || async { pod.metric(&failures("not_offered")).await >= 1.0 },
    )
    .await;
    let route = pod.route("example.test").await;
    assert!(
        route["last_error"].as_str().is_some_and(
            |e| e.contains("does not offer STARTTLS") && e.contains("tls policy encrypt")
        ),
        "{route}"
    );
    assert!(
        pod.log_text().contains("does not offer STARTTLS"),
        "{}",
        pod.log_text()
    );
    assert_eq!(pod.queued().await, 4, "deferred, not sent");
    let log = primary.maillog();
    assert!(
        !log.contains("END-OF-MESSAGE") && !log.contains("from=<alice@example.test>"),
        "no envelope, no data went out in plaintext:\n{log}"
    );
    assert_eq!(pod.metric(DELIVERED_PLAIN).await, 0.0);

    // the primary gets a certificate (any: encrypt does not check it): the mail goes, in order
    let ca = TestCa::new("the primary's CA");
    let (cert, key) = ca
        .issue(&["127.0.0.1"])
        .write(&primary.dir.path().join("etc"));
    primary.enable_tls(&cert, &key, "may").await;
    pod.wait_empty(Duration::from_secs(60)).await;
    let order = with_tag(&primary.received_order(), "encrypt");
    let expected: Vec<String> = (0..4).map(|i| format!("encrypt.{i}@test")).collect();
    assert_eq!(order, expected);
    assert_eq!(pod.metric(DELIVERED_TLS).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn may_takes_tls_when_offered_and_plaintext_otherwise() {
    let primary = Primary::start();
    let plain = mxpod(&primary, "may", None).await;
    queue(&plain, "may-plain", 2).await;
    plain.set_replay(1, 0).await;
    plain.wait_empty(Duration::from_secs(30)).await;
    assert_eq!(plain.metric(DELIVERED_PLAIN).await, 2.0);
    assert_eq!(
        plain.metric(&failures("not_offered")).await,
        0.0,
        "may is content without"
    );

    let ca = TestCa::new("the primary's CA");
    let (cert, key) = ca
        .issue(&["127.0.0.1"])
        .write(&primary.dir.path().join("etc"));
    primary.enable_tls(&cert, &key, "may").await;
    let tls = mxpod(&primary, "may", None).await;
    queue(&tls, "may-tls", 2).await;
    tls.set_replay(1, 0).await;
    tls.wait_empty(Duration::from_secs(30)).await;
    assert_eq!(
        tls.metric(DELIVERED_TLS).await,
        2.0,
        "STARTTLS once offered (the certificate is not checked under may)"
    );
    assert_eq!(tls.metric(DELIVERED_PLAIN).await, 0.0);
    let order = primary.received_order();
    assert_eq!(with_tag(&order, "may-plain").len(), 2);
    assert_eq!(with_tag(&order, "may-tls").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_holds_mail_for_a_primary_that_cannot_meet_the_policy() {
    let primary = Primary::start(); // answers SMTP, no STARTTLS
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.domain_extra = "tls_policy = \"encrypt\"\n".into();
    cfg.auto = true;
    cfg.workers = 2;
    let pod = MxPod::start(cfg).await;
    queue(&pod, "auto", 2).await;
    wait_for(
        "the probe to judge the primary",
        Duration::from_secs(30),
        || async { pod.log_text().contains("fails the TLS policy") },
    )
    .await;
    let route = pod.route("example.test").await;
    assert_eq!(route["primary_up"], false, "{route}");
    assert!(
        pod.log_text().contains("STARTTLS is not offered"),
        "{}",
        pod.log_text()
    );
    assert_eq!(pod.queued().await, 2, "held, not sent in plaintext");
    assert!(!primary.maillog().contains("END-OF-MESSAGE"));
}
