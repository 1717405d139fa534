//! rspamd before the queue, with a real rspamd: GTUBE is refused at the end of DATA and never
//! queued; what is accepted carries rspamd's verdict in `X-Spam-*` headers (forged ones from
//! the sender are gone); an unreachable rspamd tempfails or accepts as `fail_mode` says.

use backupmx_tests::{
    MxPod, MxPodConfig, Sink,
    realparts::{PowerDns, Rspamd, Smtp, header_fields, rejected, replay_to_sink},
};

const GTUBE: &[u8] = b"From: <spammer@sender.test>\r\nTo: <user@example.test>\r\nSubject: gtube\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <gtube.1@sender.test>\r\n\r\nXJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X\r\n";

/// A short plain-text mail, marked by its Message-ID `<TAG@sender.test>`; `forged` is put on
/// top of the header (headers only the filter may set).
fn plain(tag: &str, forged: &str) -> Vec<u8> {
    format!(
        "{forged}From: <alice@sender.test>\r\nTo: <user@example.test>\r\nSubject: lunch {tag}\r\nDate: Wed, 25 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{tag}@sender.test>\r\n\r\nHello Bob, lunch tomorrow?\r\n"
    )
    .into_bytes()
}

fn rspamd_filter(url: &str, fail_mode: &str) -> String {
    format!("[filter.rspamd]\nurl = \"{url}\"\ntimeout = \"10s\"\nfail_mode = \"{fail_mode}\"\n")
}

/// A session with `pod`, past EHLO; through a PROXY header naming `client` when given.
async fn session(pod: &MxPod, client: Option<&str>) -> Smtp {
    let mut c = match client {
        Some(ip) => Smtp::connect_as(pod.smtp, ip).await,
        None => Smtp::connect(pod.smtp).await,
    };
    c.expect("EHLO client.test", "250").await;
    c
}

/// Sends `body` from `from` to user@example.test in session `c`; the end-of-DATA reply must
/// start with `want` (`what` and `pod`'s log explain a failure).
async fn expect_mail(c: &mut Smtp, pod: &MxPod, from: &str, body: &[u8], want: &str, what: &str) {
    let r = c.mail(from, &["user@example.test"], body).await;
    assert!(r.starts_with(want), "{what}: {r}\n{}", pod.log_text());
}

/// The dumped message whose Message-ID is `<TAG@sender.test>`.
fn find<'a>(dumps: &'a [String], tag: &str) -> &'a str {
    let mid = format!("<{tag}@sender.test>");
    dumps
        .iter()
        .find(|d| d.contains(&mid))
        .unwrap_or_else(|| panic!("{mid} not delivered: {dumps:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rspamd_refuses_gtube_and_annotates_accepted_mail() {
    // rspamd's DNS goes to a PowerDNS without zones: every check answers REFUSED, so a plain
    // message from an outside address scores "add header" (RDNS_NONE, HFILTER_*, ...)
    let pdns = PowerDns::start();
    let rspamd = Rspamd::start_with_dns(Some(&pdns.dns_addr()));
    let sink = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.smtp_extra.push_str("proxy_protocol = true\n");
    cfg.extra = rspamd_filter(&rspamd.url, "tempfail");
    let pod = MxPod::start(cfg).await;

    // from outside (a load balancer's PROXY header names 192.0.2.10)
    let mut c = session(&pod, Some("192.0.2.10")).await;
    expect_mail(
        &mut c,
        &pod,
        "spammer@sender.test",
        GTUBE,
        "550 5.7.1",
        "GTUBE at end of DATA",
    )
    .await;
    assert_eq!(pod.queued().await, 0, "a refused message is not queued");
    expect_mail(
        &mut c,
        &pod,
        "alice@sender.test",
        &plain("outside", ""),
        "250 2.0.0",
        "plain mail from outside ('add header')",
    )
    .await;
    c.quit().await;

    // ham from the loopback network, carrying a forged "clean" verdict
    let mut c = session(&pod, Some("127.0.0.1")).await;
    let forged = "X-Spam-Status: No, score=-100.00 required=15.00 (forged)\r\nX-Spam: No\r\nX-Spam-Score: -100.00\r\n";
    expect_mail(
        &mut c,
        &pod,
        "alice@sender.test",
        &plain("ham", forged),
        "250 2.0.0",
        "ham",
    )
    .await;
    c.quit().await;

    assert_eq!(pod.queued().await, 2);
    assert_eq!(rejected(&pod, "spam").await, 1);
    assert_eq!(rejected(&pod, "filter_unavailable").await, 0);

    let dumps = replay_to_sink(&pod, &sink, 2).await;
    assert!(
        !dumps.iter().any(|d| d.contains("GTUBE")),
        "GTUBE never delivered"
    );

    let ham = find(&dumps, "ham");
    let status = header_fields(ham, "X-Spam-Status");
    assert_eq!(status.len(), 1, "one X-Spam-Status, ours: {ham}");
    assert!(
        status[0].starts_with("X-Spam-Status: No, score=")
            && status[0].contains("action=\"no action\""),
        "{status:?}"
    );
    let score = header_fields(ham, "X-Spam-Score");
    assert_eq!(score.len(), 1, "{ham}");
    assert_ne!(
        score[0], "X-Spam-Score: -100.00",
        "the forged score is gone"
    );
    assert!(
        header_fields(ham, "X-Spam").is_empty(),
        "the forged X-Spam: No is gone and ham gets none: {ham}"
    );
    assert!(
        !ham.contains("(forged)") && !ham.contains("-100.00"),
        "{ham}"
    );

    let outside = find(&dumps, "outside");
    assert_eq!(
        header_fields(outside, "X-Spam"),
        vec!["X-Spam: Yes".to_owned()],
        "{outside}"
    );
    let status = header_fields(outside, "X-Spam-Status");
    assert_eq!(status.len(), 1, "{outside}");
    assert!(
        status[0].starts_with("X-Spam-Status: Yes, score=")
            && status[0].contains("action=\"add header\""),
        "{status:?}"
    );
    assert_eq!(header_fields(outside, "X-Spam-Score").len(), 1, "{outside}");
    assert!(
        outside.contains("Received: from client.test ([192.0.2.10])"),
        "{outside}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rspamd_down_tempfails_or_accepts_as_fail_mode_says() {
    let mut rspamd = Rspamd::start();
    let sink = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.extra = rspamd_filter(&rspamd.url, "tempfail");
    let tempfail = MxPod::start(cfg.clone()).await;
    cfg.extra = rspamd_filter(&rspamd.url, "accept");
    let accept = MxPod::start(cfg).await;

    // while rspamd answers, both scan and queue (from 127.0.0.1: "no action")
    for (pod, tag) in [(&tempfail, "up-t"), (&accept, "up-a")] {
        let mut c = session(pod, None).await;
        expect_mail(
            &mut c,
            pod,
            "alice@sender.test",
            &plain(tag, ""),
            "250 2.0.0",
            "{tag}",
        )
        .await;
        c.quit().await;
    }

    rspamd.stop();

    let mut c = session(&tempfail, None).await;
    expect_mail(
        &mut c,
        &tempfail,
        "alice@sender.test",
        &plain("down-t", ""),
        "451 4.7.1",
        "rspamd down, fail_mode tempfail",
    )
    .await;
    // the session goes on: the sender may retry later, or now
    c.expect("NOOP", "250").await;
    c.quit().await;
    assert_eq!(
        tempfail.queued().await,
        1,
        "only the message scanned earlier"
    );
    assert_eq!(rejected(&tempfail, "filter_unavailable").await, 1);

    let mut c = session(&accept, None).await;
    expect_mail(
        &mut c,
        &accept,
        "alice@sender.test",
        &plain("down-a", ""),
        "250 2.0.0",
        "rspamd down, fail_mode accept",
    )
    .await;
    c.quit().await;
    assert_eq!(accept.queued().await, 2);
    assert_eq!(rejected(&accept, "filter_unavailable").await, 0);

    let dumps = replay_to_sink(&accept, &sink, 2).await;
    let scanned = find(&dumps, "up-a");
    assert_eq!(header_fields(scanned, "X-Spam-Score").len(), 1, "{scanned}");
    assert_eq!(
        header_fields(scanned, "X-Spam-Status").len(),
        1,
        "{scanned}"
    );
    let unscanned = find(&dumps, "down-a");
    assert!(
        header_fields(unscanned, "X-Spam-Status").is_empty(),
        "accepted unscanned: no verdict is claimed: {unscanned}"
    );
}

/// rspamd behind a TLS front (as a reverse proxy or sidecar serves it in production): with the
/// front's CA in `trust.ca_file` the scan works over HTTPS (GTUBE refused, ham queued); a server
/// that does not trust that CA refuses the certificate and applies its fail mode, and its log
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rspamd_over_https_is_verified_and_an_untrusted_certificate_is_the_fail_mode() {
    let rspamd = Rspamd::start();
    let backend: std::net::SocketAddr = rspamd
        .url
        .trim_start_matches("http://")
        .parse()
        .expect("rspamd listens on ip:port");
    let ca = testkit::TestCa::new("rspamd front CA");
    let front = testkit::TlsFront::start(backend, &ca.issue(&["127.0.0.1"])).await;
    let sink = Sink::start(&[], 0, true).await;

    let dir = backupmx_tests::state_dir("mxpod");
    let ca_file = dir.path().join("ca.pem");
    ca.write_pem(&ca_file);
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.extra = format!(
        "{}\n[trust]\nca_file = \"{}\"\n",
        rspamd_filter(&front.url(), "tempfail"),
        ca_file.display()
    );
    let trusted = MxPod::start_in(dir, cfg.clone()).await;
    let mut c = session(&trusted, None).await;
    expect_mail(
        &mut c,
        &trusted,
        "spammer@sender.test",
        GTUBE,
        "550 5.7.1",
        "GTUBE refused after an HTTPS scan",
    )
    .await;
    expect_mail(
        &mut c,
        &trusted,
        "alice@sender.test",
        &plain("https-ham", ""),
        "250 2.0.0",
        "ham scanned over HTTPS",
    )
    .await;
    c.quit().await;
    assert_eq!(rejected(&trusted, "spam").await, 1);
    assert_eq!(rejected(&trusted, "filter_unavailable").await, 0);
    let dumps = replay_to_sink(&trusted, &sink, 1).await;
    let ham = find(&dumps, "https-ham");
    assert_eq!(
        header_fields(ham, "X-Spam-Status").len(),
        1,
        "scanned: {ham}"
    );

    // the same URL without the CA: the certificate is refused, the fail mode answers
    cfg.extra = rspamd_filter(&front.url(), "tempfail");
    let untrusting = MxPod::start(cfg).await;
    let mut c = session(&untrusting, None).await;
    expect_mail(
        &mut c,
        &untrusting,
        "alice@sender.test",
        &plain("untrusted", ""),
        "451 4.7.1",
        "an rspamd whose certificate is not trusted is unavailable",
    )
    .await;
    c.quit().await;
    assert_eq!(untrusting.queued().await, 0);
    assert_eq!(rejected(&untrusting, "filter_unavailable").await, 1);
    let log = untrusting.log_text();
    assert!(
        log.contains("rspamd unavailable") && log.contains("UnknownIssuer"),
        "the log names the certificate problem:\n{log}"
    );
}
