//! DNS-based filters against a real PowerDNS: a DNSBL refuses listed clients at RCPT (answers
//! cached by their TTL, a broken resolver never refuses), and SPF/DMARC (`auth = "enforce"` /
//! `"header"`) refuse or record what the sender's domain publishes. Clients are presented with
//! PROXY headers so that documentation addresses (192.0.2.x) can be tested from loopback.

use backupmx_tests::{
    MxPod, MxPodConfig, Sink, free_port,
    realparts::{PowerDns, Smtp, header_fields, rejected, replay_to_sink},
};

/// A plain mail from `from` (also the `From:` header), marked by Message-ID `<TAG@test>`, with
/// `extra` header fields on top.
fn mail(tag: &str, from: &str, extra: &str) -> Vec<u8> {
    format!(
        "{extra}From: <{from}>\r\nTo: <user@example.test>\r\nSubject: {tag}\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@test>\r\n\r\nhello\r\n"
    )
    .into_bytes()
}

fn find<'a>(dumps: &'a [String], tag: &str) -> &'a str {
    let mid = format!("<{tag}@test>");
    dumps
        .iter()
        .find(|d| d.contains(&mid))
        .unwrap_or_else(|| panic!("{mid} not delivered: {dumps:#?}"))
}

/// RCPT TO:<user@example.test> from `client` in a fresh session: the reply.
async fn rcpt_from(pod: &MxPod, client: &str) -> String {
    let mut c = Smtp::connect_as(pod.smtp, client).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<someone@sender.test>", "250").await;
    let r = c.cmd("RCPT TO:<user@example.test>").await;
    c.quit().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsbl_refuses_listed_clients_and_caches_the_answer() {
    let pdns = PowerDns::start();
    pdns.create_zone("bl.test").await;
    pdns.set_records("bl.test", "10.2.0.192.bl.test", "A", 300, &["127.0.0.2"])
        .await;
    pdns.set_txt(
        "bl.test",
        "10.2.0.192.bl.test",
        300,
        "listed for testing, see https://bl.test/10",
    )
    .await;
    assert_eq!(pdns.dig("10.2.0.192.bl.test", "A"), "127.0.0.2");

    let mut cfg = MxPodConfig::new("127.0.0.1:9");
    cfg.smtp_extra.push_str("proxy_protocol = true\n");
    cfg.extra = format!(
        "[filter]\nresolver = \"{}\"\ndns_timeout = \"2s\"\ndnsbl = [\"bl.test\"]\n",
        pdns.dns_addr()
    );
    let pod = MxPod::start(cfg).await;

    let r = rcpt_from(&pod, "192.0.2.10").await;
    assert!(
        r.starts_with("554 5.7.1") && r.contains("bl.test") && r.contains("192.0.2.10"),
        "listed client: {r}\n{}",
        pod.log_text()
    );
    assert!(r.contains("listed for testing"), "the TXT reason: {r}");
    let r = rcpt_from(&pod, "192.0.2.11").await;
    assert!(r.starts_with("250 2.1.5"), "unlisted client: {r}");

    // a whole message from the unlisted client is queued
    let mut c = Smtp::connect_as(pod.smtp, "192.0.2.11").await;
    c.expect("EHLO client.test", "250").await;
    let r = c
        .mail(
            "someone@sender.test",
            &["user@example.test"],
            &mail("clean", "someone@sender.test", ""),
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    c.quit().await;
    assert_eq!(pod.queued().await, 1);

    // the listing goes away at the list, but mx-pod's resolver keeps the answer for its TTL
    pdns.delete_records("bl.test", "10.2.0.192.bl.test", "A")
        .await;
    assert_eq!(
        pdns.dig("10.2.0.192.bl.test", "A"),
        "",
        "PowerDNS no longer lists it"
    );
    let r = rcpt_from(&pod, "192.0.2.10").await;
    assert!(
        r.starts_with("554 5.7.1") && r.contains("bl.test"),
        "still refused from the cache (TTL 300): {r}"
    );
    assert_eq!(rejected(&pod, "dnsbl").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dnsbl_with_a_dead_resolver_never_refuses() {
    let dead = format!("127.0.0.1:{}", free_port()); // nothing answers there
    let mut cfg = MxPodConfig::new("127.0.0.1:9");
    cfg.smtp_extra.push_str("proxy_protocol = true\n");
    cfg.extra =
        format!("[filter]\nresolver = \"{dead}\"\ndns_timeout = \"1s\"\ndnsbl = [\"bl.test\"]\n");
    let pod = MxPod::start(cfg).await;
    let r = rcpt_from(&pod, "192.0.2.10").await;
    assert!(
        r.starts_with("250 2.1.5"),
        "a failed lookup never refuses: {r}\n{}",
        pod.log_text()
    );
    assert!(
        pod.log_text().contains("DNSBL lookup failed"),
        "the failure is logged:\n{}",
        pod.log_text()
    );
    assert_eq!(rejected(&pod, "dnsbl").await, 0);
}

/// A PowerDNS serving `sender.test` with `v=spf1 ip4:192.0.2.10 -all` and DMARC `p=reject`.
///
/// It also serves an empty `test.` zone, standing in for the TLD's servers: the DMARC tree walk
/// (RFC 9989, mail-auth 0.13) goes on to `_dmarc.test.` after finding the author domain's
/// record, and only an NXDOMAIN there (what the real DNS answers for a TLD without a record)
/// lets it conclude; a REFUSED (no such zone) turns the whole result into `temperror`.
async fn sender_domain() -> PowerDns {
    let pdns = PowerDns::start();
    pdns.create_zone("test").await;
    pdns.create_zone("sender.test").await;
    pdns.set_txt(
        "sender.test",
        "sender.test",
        300,
        "v=spf1 ip4:192.0.2.10 -all",
    )
    .await;
    pdns.set_txt(
        "sender.test",
        "_dmarc.sender.test",
        300,
        "v=DMARC1; p=reject",
    )
    .await;
    assert_eq!(
        pdns.dig("_dmarc.sender.test", "TXT"),
        "\"v=DMARC1; p=reject\""
    );
    pdns
}

fn auth_pod(sink: &Sink, pdns: &PowerDns, mode: &str) -> MxPodConfig {
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.smtp_extra.push_str("proxy_protocol = true\n");
    cfg.extra = format!(
        "[filter]\nresolver = \"{}\"\ndns_timeout = \"2s\"\n",
        pdns.dns_addr()
    );
    cfg.domain_extra = format!("auth = \"{mode}\"\n");
    cfg
}

/// A forged verdict in our own name (must be removed), and one by another host (kept).
const FORGED: &str = "Authentication-Results: mx2.example.test; spf=pass (forged) smtp.mailfrom=sender.test; dmarc=pass (forged)\r\nAuthentication-Results: upstream.example; spf=none\r\n";

async fn send_from(pod: &MxPod, client: &str, tag: &str) -> String {
    let mut c = Smtp::connect_as(pod.smtp, client).await;
    c.expect("EHLO client.test", "250").await;
    let r = c
        .mail(
            "alice@sender.test",
            &["user@example.test"],
            &mail(tag, "alice@sender.test", FORGED),
        )
        .await;
    c.quit().await;
    r
}

// The plainest spoof (SPF -all fails, no signature, p=reject) is refused. Regression guard: an
// earlier auth.rs required `dmarc.dkim_result()` and `dmarc.spf_result()` to be `Fail`, which
// mail-auth reports only for checks that passed unaligned, so this spoof was queued; auth.rs
// now decides on `dmarc.result()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dmarc_reject_is_enforced_for_an_unauthorized_client() {
    let pdns = sender_domain().await;
    let sink = Sink::start(&[], 0, true).await;
    let pod = MxPod::start(auth_pod(&sink, &pdns, "enforce")).await;

    let r = send_from(&pod, "192.0.2.66", "forged-sender").await;
    assert!(
        r.starts_with("550 5.7.1"),
        "SPF fail + DMARC p=reject from 192.0.2.66: {r}\n{}",
        pod.log_text()
    );
    assert_eq!(pod.queued().await, 0);
    assert_eq!(rejected(&pod, "auth_failed").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_accepts_the_authorized_client_and_records_spf_pass() {
    let pdns = sender_domain().await;
    let sink = Sink::start(&[], 0, true).await;
    let pod = MxPod::start(auth_pod(&sink, &pdns, "enforce")).await;

    let r = send_from(&pod, "192.0.2.10", "good-sender").await;
    assert!(
        r.starts_with("250 2.0.0"),
        "from the SPF-listed address: {r}\n{}",
        pod.log_text()
    );
    assert_eq!(rejected(&pod, "auth_failed").await, 0);
    let dumps = replay_to_sink(&pod, &sink, 1).await;
    let m = find(&dumps, "good-sender");
    let results = header_fields(m, "Authentication-Results");
    let ours: Vec<&String> = results
        .iter()
        .filter(|h| h.starts_with("Authentication-Results: mx2.example.test"))
        .collect();
    assert_eq!(
        ours.len(),
        1,
        "exactly one verdict in our name: {results:#?}"
    );
    assert!(
        ours[0].contains("spf=pass") && ours[0].contains("dmarc=pass"),
        "{ours:?}"
    );
    assert!(!m.contains("(forged)"), "the forged verdict is gone: {m}");
    assert!(
        results
            .iter()
            .any(|h| h == "Authentication-Results: upstream.example; spf=none"),
        "another host's verdict is kept: {results:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_header_mode_records_failures_without_refusing() {
    let pdns = sender_domain().await;
    let sink = Sink::start(&[], 0, true).await;
    let pod = MxPod::start(auth_pod(&sink, &pdns, "header")).await;

    let r = send_from(&pod, "192.0.2.66", "unauthorized").await;
    assert!(
        r.starts_with("250 2.0.0"),
        "header mode only records: {r}\n{}",
        pod.log_text()
    );
    assert_eq!(rejected(&pod, "auth_failed").await, 0);
    let dumps = replay_to_sink(&pod, &sink, 1).await;
    let m = find(&dumps, "unauthorized");
    let results = header_fields(m, "Authentication-Results");
    let ours: Vec<&String> = results
        .iter()
        .filter(|h| h.starts_with("Authentication-Results: mx2.example.test"))
        .collect();
    assert_eq!(ours.len(), 1, "{results:#?}");
    assert!(
        ours[0].contains("spf=fail") && ours[0].contains("dmarc=fail"),
        "{ours:?}"
    );
    assert!(
        !m.contains("spf=pass") && !m.contains("(forged)"),
        "no forged pass survives: {m}"
    );
}
