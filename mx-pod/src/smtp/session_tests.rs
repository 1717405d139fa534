//! Session tests: a real [`Session`] over an in-memory stream, driven like a client would.

use super::*;
use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

use super::super::tls::Tls;

/// A client driving a real session over an in-memory stream, Stalwart style.
struct Client<T = DuplexStream> {
    r: BufReader<tokio::io::ReadHalf<T>>,
    w: tokio::io::WriteHalf<T>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Client<T> {
    fn new(io: T) -> Self {
        let (r, w) = tokio::io::split(io);
        Client {
            r: BufReader::new(r),
            w,
        }
    }

    /// The stream back (e.g. to start TLS on it).
    fn into_inner(self) -> T {
        self.r.into_inner().unsplit(self.w)
    }

    async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            self.r.read_line(&mut line).await.unwrap();
            assert!(!line.is_empty(), "server hung up; so far: {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }
    async fn cmd(&mut self, line: &str, expect: &str) -> String {
        self.w
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        let r = self.reply().await;
        assert!(
            r.starts_with(expect),
            "{line:?}: expected {expect:?}, got {r:?}"
        );
        r
    }
    async fn raw(&mut self, bytes: &[u8], expect: &str) -> String {
        self.w.write_all(bytes).await.unwrap();
        let r = self.reply().await;
        assert!(r.starts_with(expect), "expected {expect:?}, got {r:?}");
        r
    }

    /// `EHLO client.test`, accepted; returns the reply (the extensions).
    async fn ehlo(&mut self) -> String {
        self.cmd("EHLO client.test", "250").await
    }

    /// A transaction opened: `MAIL FROM:<from>` and `RCPT TO` each of `rcpts`, all accepted.
    async fn transaction(&mut self, from: &str, rcpts: &[&str]) {
        self.cmd(&format!("MAIL FROM:<{from}>"), "250").await;
        self.rcpts(rcpts, "250").await;
    }

    /// `RCPT TO` each of `rcpts`, every reply starting with `expect`.
    async fn rcpts(&mut self, rcpts: &[&str], expect: &str) {
        for r in rcpts {
            self.cmd(&format!("RCPT TO:<{r}>"), expect).await;
        }
    }

    /// `DATA` (answered 354), then `message` with its final dot; the reply starts with `expect`.
    async fn send_message(&mut self, message: &[u8], expect: &str) -> String {
        self.cmd("DATA", "354").await;
        self.raw(message, expect).await
    }
}

/// A short message with its final dot.
const HELLO: &[u8] = b"Subject: hi\r\n\r\nhello\r\n.\r\n";

struct Harness {
    client: Client,
    queue: Queue,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

/// How to configure a test session.
#[derive(Default)]
struct Opts {
    /// TOML added to `[smtp]`.
    smtp: &'static str,
    /// TOML added to `[queue]`.
    queue: &'static str,
    /// TOML added to the `example.test` domain.
    domain: &'static str,
    /// A self-signed certificate for STARTTLS.
    tls: Option<Arc<Tls>>,
    /// Do not wait for the banner (PROXY protocol: the client speaks first).
    no_banner: bool,
    /// The TCP peer (default 192.0.2.7:4000).
    peer: Option<&'static str>,
    /// Share limits with other sessions.
    filters: Option<Arc<Filters>>,
}

async fn start_with(extra: &'static str) -> Harness {
    start_opts(Opts {
        queue: extra,
        ..Default::default()
    })
    .await
}

fn config_text(dir: &std::path::Path, o: &Opts) -> String {
    format!(
        "hostname = \"mx2.example.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\nmax_message_size = 2048\nmax_recipients = 3\nmax_received_headers = 5\n{}\n[queue]\ndir = \"{}\"\n{}\n[[domains]]\nname = \"example.test\"\nprimary = \"127.0.0.1:2525\"\n{}\n[[domains]]\nname = \"bücher.test\"\nprimary = \"127.0.0.1:2525\"\n",
        o.smtp,
        dir.display(),
        o.queue,
        o.domain
    )
}

async fn start_opts(o: Opts) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(Config::parse(&config_text(dir.path(), &o), "test").unwrap());
    let (queue, _) = Queue::open(&config.queue).unwrap();
    let metrics = Arc::new(Metrics::new());
    let ctx = Arc::new(SessionContext {
        filters: o.filters.clone().unwrap_or_else(|| {
            Arc::new(Filters::new(&config, &crate::trust::Trust::webpki()).unwrap())
        }),
        data_budget: Arc::new(crate::smtp::budget::DataBudget::new(
            config.smtp.max_inflight_data.0,
            config.smtp.max_message_size.0,
        )),
        config,
        queue: queue.clone(),
        metrics: metrics.clone(),
        tls: o.tls.clone(),
    });
    let (a, b) = tokio::io::duplex(64 * 1024);
    let shutdown = CancellationToken::new();
    let peer = o.peer.unwrap_or("192.0.2.7:4000").parse().unwrap();
    let session = Session::new(b, ctx, peer, shutdown.clone());
    let task = tokio::spawn(session.run());
    let mut client = Client::new(a);
    if !o.no_banner {
        let banner = client.reply().await;
        assert!(banner.starts_with("220 mx2.example.test ESMTP"), "{banner}");
    }
    Harness {
        client,
        queue,
        shutdown,
        metrics,
        _dir: dir,
        task,
    }
}

async fn start() -> Harness {
    start_with("").await
}

#[tokio::test]
async fn ehlo_advertises_extensions() {
    let mut h = start().await;
    let r = h.client.cmd("EHLO client.test", "250-").await;
    for ext in [
        "PIPELINING",
        "SIZE 2048",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "DSN",
    ] {
        assert!(r.contains(ext), "missing {ext}: {r}");
    }
    assert!(!r.contains("STARTTLS"), "STARTTLS only when configured");
}

#[tokio::test]
async fn message_is_queued_with_received_header_before_250() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@sender.test> RET=HDRS ENVID=abc", "250 2.1.0")
        .await;
    c.cmd(
        "RCPT TO:<User@Example.Test> NOTIFY=FAILURE,DELAY",
        "250 2.1.5",
    )
    .await;
    let r = c
        .send_message(
            b"Subject: hi\r\n\r\n..dot\r\nbody\r\n.\r\n",
            "250 2.0.0 Ok: queued as ",
        )
        .await;
    let id: crate::queue::message::QueueId = r.trim().rsplit(' ').next().unwrap().parse().unwrap();
    let env = h.queue.get(id).expect("queued before 250");
    assert_eq!(env.sender, "a@sender.test");
    assert_eq!(env.recipients[0].domain, "example.test");
    assert!(env.recipients[0].notify.explicit && env.recipients[0].notify.delay);
    assert_eq!(env.ret, Some(DsnRet::Hdrs));
    assert_eq!(env.env_id.as_deref(), Some("abc"));
    let body = h.queue.read_body_of(id).unwrap();
    let text = String::from_utf8(body).unwrap();
    assert!(text.starts_with("Received: from client.test ([192.0.2.7])\r\n\tby mx2.example.test (mx-pod) with ESMTP id "), "{text}");
    assert!(
        text.ends_with("Subject: hi\r\n\r\n.dot\r\nbody\r\n"),
        "dot un-stuffed: {text:?}"
    );
}

#[tokio::test]
async fn pipelined_commands_get_replies_in_order() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.w.write_all(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<x@example.test>\r\nRCPT TO:<y@other.test>\r\nDATA\r\n").await.unwrap();
    assert!(c.reply().await.starts_with("250 2.1.0"));
    assert!(c.reply().await.starts_with("250 2.1.5"));
    assert!(c.reply().await.starts_with("550 5.7.1"));
    assert!(c.reply().await.starts_with("354"));
    c.raw(b"hi\r\n.\r\n", "250 2.0.0").await;
    assert_eq!(h.queue.totals().0, 1);
}

#[tokio::test]
async fn relay_and_sequence_errors() {
    let mut h = start().await;
    let c = &mut h.client;
    c.cmd("MAIL FROM:<a@sender.test>", "503 5.5.1").await;
    c.cmd("HELO client.test", "250").await;
    c.cmd("RCPT TO:<x@example.test>", "503 5.5.1").await;
    c.cmd("DATA", "503 5.5.1").await;
    c.cmd("MAIL FROM:<a@sender.test>", "250").await;
    c.cmd("MAIL FROM:<a@sender.test>", "503 5.5.1").await;
    c.cmd("RCPT TO:<victim@elsewhere.test>", "550 5.7.1").await;
    c.cmd("RCPT TO:<@evil.test:x@example.test>", "550 5.7.1")
        .await;
    c.cmd("DATA", "554 5.5.1").await;
    c.cmd("BDAT 10 LAST", "502 5.5.1").await;
    c.cmd("FOO bar", "500 5.5.2").await;
    c.cmd("QUIT", "221").await;
}

#[tokio::test]
async fn bare_postmaster_is_accepted_for_the_first_domain() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.transaction("a@sender.test", &["Postmaster"]).await;
    // only the bare form: a postmaster elsewhere is still relaying
    c.rcpts(&["postmaster@elsewhere.test"], "550 5.7.1").await;
    c.rcpts(&["postmaster@"], "5").await;
    c.send_message(HELLO, "250").await;
    let queued = h.queue.list(None, 10);
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].recipients[0].address, "postmaster@example.test");
}

#[tokio::test]
async fn quoted_local_parts_are_queued_as_written() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.cmd("MAIL FROM:<\"s d\"@sender.test>", "250 2.1.0").await;
    c.rcpts(
        &["\"john doe\"@example.test", "\"x\\\"y\"@Example.test"],
        "250 2.1.5",
    )
    .await;
    // a quoted local part hiding an address is the relay trick it always was
    c.rcpts(&["\"a@b\"@example.test"], "550 5.7.1").await;
    c.send_message(HELLO, "250").await;
    let queued = h.queue.list(None, 10);
    assert_eq!(queued[0].sender, "\"s d\"@sender.test");
    let got: Vec<(&str, &str)> = queued[0]
        .recipients
        .iter()
        .map(|r| (r.address.as_str(), r.domain.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("\"john doe\"@example.test", "example.test"),
            ("\"x\\\"y\"@Example.test", "example.test")
        ]
    );
}

#[tokio::test]
async fn non_ascii_addresses_need_smtputf8() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.cmd("MAIL FROM:<jürgen@sender.test>", "553 5.6.7").await;
    c.transaction("s@sender.test", &[]).await;
    c.rcpts(&["jürgen@example.test", "user@bücher.test"], "553 5.6.7")
        .await;
    // the A-label spelling is ASCII
    c.rcpts(&["user@xn--bcher-kva.test"], "250").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<jürgen@sender.test> SMTPUTF8", "250")
        .await;
    c.rcpts(&["jürgen@bücher.test", "a@XN--BCHER-KVA.test"], "250")
        .await;
    c.send_message(HELLO, "250").await;
    let queued = h.queue.list(Some("bücher.test"), 10);
    assert_eq!(queued.len(), 1, "listed by the U-label");
    let env = &queued[0];
    assert!(env.smtputf8);
    assert_eq!(env.sender, "jürgen@sender.test");
    let routes: Vec<&str> = env.recipients.iter().map(|r| r.domain.as_str()).collect();
    assert_eq!(
        routes,
        ["xn--bcher-kva.test", "xn--bcher-kva.test"],
        "one route"
    );
    assert_eq!(
        env.recipients[0].address, "jürgen@bücher.test",
        "spelling kept"
    );
    let stats = h.queue.stats();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert!(
        h.metrics
            .render(&h.queue, &[])
            .contains("mxpod_rejected_total{reason=\"non_ascii_address\"} 3")
    );
}

#[tokio::test]
async fn limits_on_size_and_recipients() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@sender.test> SIZE=999999", "552 5.3.4")
        .await;
    c.transaction(
        "a@sender.test",
        &["u0@example.test", "u1@example.test", "u2@example.test"],
    )
    .await;
    c.rcpts(&["u9@example.test"], "452 4.5.3").await;
    let mut big = vec![b'x'; 100];
    big.extend_from_slice(b"\r\n");
    let mut data = Vec::new();
    for _ in 0..50 {
        data.extend_from_slice(&big);
    }
    data.extend_from_slice(b".\r\n");
    c.send_message(&data, "552 5.3.4").await;
    assert_eq!(h.queue.totals().0, 0);
    // the session goes on
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn bare_lf_in_data_and_commands_is_refused() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.raw(b"NOOP\n", "550 5.6.11").await;
    c.transaction("a@sender.test", &["x@example.test"]).await;
    // a smuggled second message hidden behind a bare LF end-of-data
    c.send_message(
        b"Subject: a\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n.\r\n",
        "550 5.6.11",
    )
    .await;
    assert_eq!(h.queue.totals().0, 0);
}

#[tokio::test]
async fn a_refused_body_gives_its_memory_back() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.transaction("a@sender.test", &["x@example.test"]).await;
    // more than the 1 KiB a body starts with: it takes memory from the budget; refused for a
    // bare LF inside
    let mut body = b"Subject: a\r\n\r\n".to_vec();
    body.extend(b"filler line of text\r\n".repeat(60));
    body.extend(b"bare\nline\r\n.\r\n");
    c.send_message(&body, "550 5.6.11").await;
    assert_eq!(h.queue.totals().0, 0);
    assert_eq!(
        h.metric("mxpod_smtp_data_inflight_bytes"),
        0,
        "the refused body's memory is given back and the gauge says so"
    );
}

#[tokio::test]
async fn loop_guard_counts_received_headers() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.transaction("a@sender.test", &["x@example.test"]).await;
    c.send_message(
        &b"Received: hop\r\n"
            .repeat(6)
            .into_iter()
            .chain(b"\r\nx\r\n.\r\n".iter().copied())
            .collect::<Vec<u8>>(),
        "554 5.4.6",
    )
    .await;
}

#[tokio::test]
async fn full_queue_answers_452_and_keeps_serving() {
    let mut h = start_with("max_bytes = 600").await;
    let c = &mut h.client;
    c.ehlo().await;
    c.transaction("a@sender.test", &["x@example.test"]).await;
    c.send_message(
        &[b"Subject: 1\r\n\r\n".as_slice(), &[b'a'; 300], b"\r\n.\r\n"].concat(),
        "250",
    )
    .await;
    c.transaction("a@sender.test", &["x@example.test"]).await;
    c.send_message(
        &[b"Subject: 2\r\n\r\n".as_slice(), &[b'a'; 300], b"\r\n.\r\n"].concat(),
        "452 4.3.1",
    )
    .await;
    c.cmd("MAIL FROM:<a@sender.test> SIZE=500", "452 4.3.1")
        .await;
    c.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn shutdown_lets_data_finish_then_says_421() {
    let mut h = start().await;
    h.client.ehlo().await;
    h.client
        .transaction("a@sender.test", &["x@example.test"])
        .await;
    h.shutdown.cancel();
    h.client.send_message(b"x\r\n.\r\n", "250 2.0.0").await;
    // the transaction is over: the server says 421 on its own and closes
    let r = h.client.reply().await;
    assert!(r.starts_with("421 4.3.2"), "{r}");
    h.task.await.unwrap();
    assert_eq!(h.queue.totals().0, 1);
}

#[test]
fn bare_line_endings_are_found() {
    assert!(!has_bare_line_ending(b"a\r\nb\r\n"));
    assert!(has_bare_line_ending(b"a\nb\r\n"));
    assert!(has_bare_line_ending(b"a\rb\r\n"));
    assert!(has_bare_line_ending(b"a\r\n\r"));
    assert!(has_bare_line_ending(b"\n.\n"));
}

// === filters, TLS, PROXY, limits ===

/// A self-signed certificate for mx2.example.test in `dir`; returns the acceptor and the
/// certificate (PEM).
fn test_tls(dir: &std::path::Path) -> (Arc<Tls>, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["mx2.example.test".to_string()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let tls = Tls::new(&crate::config::TlsConfig {
        cert_file: cert,
        key_file: key,
    })
    .unwrap();
    (Arc::new(tls), ck.cert.pem())
}

/// A client that verifies the server against `cert` (PEM) as mx-pod's own SMTP client does.
fn tls_client(cert: &str) -> tokio_rustls::TlsConnector {
    crate::trust::Trust::with_pem(cert.as_bytes(), "test certificate")
        .unwrap()
        .smtp_connector(crate::trust::TlsPolicy::Verify)
}

#[tokio::test]
async fn starttls_upgrades_the_session_and_drops_injected_plaintext() {
    let certs = tempfile::tempdir().unwrap();
    let (tls, cert) = test_tls(certs.path());
    let mut h = start_opts(Opts {
        tls: Some(tls),
        ..Default::default()
    })
    .await;
    let ehlo = h.client.ehlo().await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    // a command pipelined after STARTTLS in plaintext must never run (CVE-2011-0411)
    h.client.raw(b"STARTTLS\r\nRSET\r\n", "220 2.0.0").await;
    let stream = std::mem::replace(&mut h.client, Client::new(tokio::io::duplex(1).0)).into_inner();
    let name = rustls::pki_types::ServerName::try_from("mx2.example.test").unwrap();
    let tls_stream = tls_client(&cert).connect(name, stream).await.unwrap();
    let mut c = Client::new(tls_stream);
    // the injected RSET's reply would come first if it had run
    let ehlo = c.ehlo().await;
    assert!(!ehlo.contains("STARTTLS"), "not offered twice: {ehlo}");
    c.cmd("STARTTLS", "503 5.5.1").await;
    c.transaction("a@sender.test", &["u@example.test"]).await;
    c.send_message(b"Subject: tls\r\n\r\nhi\r\n.\r\n", "250 2.0.0")
        .await;
    let (id, _) = {
        let env = h.queue.list(None, 10);
        (env[0].id, ())
    };
    let body = String::from_utf8(h.queue.read_body_of(id).unwrap()).unwrap();
    assert!(body.contains("with ESMTPS id"), "{body}");
}

#[tokio::test]
async fn starttls_is_not_offered_or_accepted_without_a_certificate() {
    let mut h = start().await;
    let ehlo = h.client.ehlo().await;
    assert!(!ehlo.contains("STARTTLS"));
    h.client.cmd("STARTTLS", "502 5.5.1").await;
}

#[tokio::test]
async fn proxy_header_names_the_client() {
    let mut h = start_opts(Opts {
        smtp: "proxy_protocol = true",
        no_banner: true,
        ..Default::default()
    })
    .await;
    h.client
        .raw(
            b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 25\r\n",
            "220 mx2.example.test",
        )
        .await;
    let ehlo = h.client.ehlo().await;
    assert!(ehlo.contains("[198.51.100.7]"), "{ehlo}");
    h.client
        .transaction("a@sender.test", &["u@example.test"])
        .await;
    h.client
        .send_message(b"Subject: p\r\n\r\nx\r\n.\r\n", "250")
        .await;
    let id = h.queue.list(None, 1)[0].id;
    let body = String::from_utf8(h.queue.read_body_of(id).unwrap()).unwrap();
    assert!(body.contains("([198.51.100.7])"), "{body}");
    assert_eq!(h.queue.get(id).unwrap().client.ip, "198.51.100.7");
}

#[tokio::test]
async fn a_connection_without_the_proxy_header_is_refused() {
    let mut h = start_opts(Opts {
        smtp: "proxy_protocol = true",
        no_banner: true,
        ..Default::default()
    })
    .await;
    h.client.raw(b"EHLO client.test\r\n", "421 4.7.0").await;
    assert_eq!(h.metrics_label("proxy_header"), 1);
    h.task.await.unwrap();
}

impl Harness {
    /// `mxpod_rejected_total{reason=...}`.
    fn metrics_label(&self, reason: &str) -> u64 {
        self.metric(&format!("mxpod_rejected_total{{reason=\"{reason}\"}}"))
    }

    /// The value of one series (`name{labels}` as rendered; 0 when absent).
    fn metric(&self, series: &str) -> u64 {
        let text = self.metrics.render(&self.queue, &[]);
        let needle = format!("{series} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&needle))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

#[tokio::test]
async fn message_and_recipient_rates_per_client_are_limited() {
    let mut h = start_opts(Opts {
        smtp: "max_messages_per_minute = 2\nmax_recipients_per_minute = 2",
        ..Default::default()
    })
    .await;
    let c = &mut h.client;
    c.ehlo().await;
    c.transaction("a@sender.test", &["u1@example.test", "u2@example.test"])
        .await;
    c.rcpts(&["u3@example.test"], "451 4.7.1").await;
    c.cmd("RSET", "250").await;
    c.transaction("a@sender.test", &[]).await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<a@sender.test>", "451 4.7.1").await;
    assert_eq!(h.metrics_label("rate_limited"), 2);
}

#[tokio::test]
async fn connections_per_client_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::parse(
        &config_text(
            dir.path(),
            &Opts {
                smtp: "max_connections_per_ip = 1",
                ..Default::default()
            },
        ),
        "t",
    )
    .unwrap();
    let filters = Arc::new(Filters::new(&config, &crate::trust::Trust::webpki()).unwrap());
    let first = start_opts(Opts {
        smtp: "max_connections_per_ip = 1",
        filters: Some(filters.clone()),
        ..Default::default()
    })
    .await;
    let mut second = start_opts(Opts {
        smtp: "max_connections_per_ip = 1",
        filters: Some(filters.clone()),
        no_banner: true,
        ..Default::default()
    })
    .await;
    let r = second.client.reply().await;
    assert!(r.starts_with("421 4.7.0"), "{r}");
    let mut other = start_opts(Opts {
        smtp: "max_connections_per_ip = 1",
        filters: Some(filters.clone()),
        peer: Some("192.0.2.99:4000"),
        ..Default::default()
    })
    .await;
    other.client.cmd("NOOP", "250").await;
    // the first session ends (client hangs up): its slot is free again
    let Harness { client, task, .. } = first;
    drop(client);
    task.await.unwrap();
    let mut first_again = start_opts(Opts {
        smtp: "max_connections_per_ip = 1",
        filters: Some(filters.clone()),
        ..Default::default()
    })
    .await;
    first_again.client.cmd("NOOP", "250").await;
}

#[tokio::test]
async fn list_mode_refuses_unknown_recipients_at_rcpt() {
    let mut h = start_opts(Opts {
        domain: "recipients = { mode = \"list\", addresses = [\"alice@example.test\"] }",
        ..Default::default()
    })
    .await;
    let c = &mut h.client;
    c.ehlo().await;
    c.transaction("a@sender.test", &["Alice@Example.test"])
        .await;
    c.rcpts(&["bob@example.test"], "550 5.1.1").await;
}

#[tokio::test]
async fn idn_domains_are_accepted_in_both_forms() {
    let mut h = start().await;
    let c = &mut h.client;
    c.ehlo().await;
    c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8", "250").await;
    c.rcpts(&["user@bücher.test", "user@xn--bcher-kva.test"], "250")
        .await;
    // UTS 46 mappings (upper case, full-width letters) are for user interfaces: on the wire
    // only the U-label and the A-label name the domain
    let mapped = [
        "user@BÜCHER.test",
        "user@ｅｘａｍｐｌｅ.test",
        "user@example。test",
    ];
    c.rcpts(&mapped, "550 5.7.1").await;
    c.cmd("RSET", "250").await;
    c.cmd("MAIL FROM:<a@sender.test> SMTPUTF8", "250").await;
    c.rcpts(&["user@bucher.test", "user@bü-cher.test"], "550 5.7.1")
        .await;
}

/// The published SMTP-smuggling end-of-data look-alikes: none ends the message, none lets a
/// second transaction in; the whole DATA is refused and the session goes on cleanly.
#[tokio::test]
async fn smuggling_variants_never_split_a_message() {
    let variants: [&[u8]; 10] = [
        b"\r\n.\r\r\n",
        b"\r\n.\r\r\r\n",
        b"\n.\n",
        b"\r.\r",
        b"\r\n.\r",
        b"\n.\r\n",
        b"\r.\r\n",
        b"\r\n.\n",
        b"\n.\r",
        b"\r\n\x00.\r\n",
    ];
    for v in variants {
        let mut h = start().await;
        let c = &mut h.client;
        c.ehlo().await;
        c.transaction("a@sender.test", &["u@example.test"]).await;
        let mut data = b"Subject: first\r\n\r\nhello".to_vec();
        data.extend_from_slice(v);
        data.extend_from_slice(
            b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n",
        );
        let reply = c.send_message(&data, "").await;
        if v == b"\r\n\x00.\r\n" {
            // NUL is not a line ending: one message, queued whole
            assert!(reply.starts_with("250"), "{reply}");
            assert_eq!(h.queue.totals().0, 1);
            continue;
        }
        assert!(reply.starts_with("550 5.6.11"), "{v:?}: {reply}");
        // exactly one reply: the next command gets its own
        c.cmd("NOOP", "250 2.0.0").await;
        assert_eq!(h.queue.totals().0, 0, "{v:?}: nothing queued");
        // the session goes on with a clean message
        c.transaction("a@sender.test", &["u@example.test"]).await;
        c.send_message(b"Subject: clean\r\n\r\nok\r\n.\r\n", "250")
            .await;
        assert_eq!(h.queue.totals().0, 1);
    }
}

#[test]
fn end_of_data_is_exactly_crlf_dot_crlf_across_reads() {
    let mut e = EndOfData::default();
    assert_eq!(e.scan(b".\r\n"), Some(3), "empty message");
    let mut e = EndOfData::default();
    assert_eq!(e.scan(b"a\r\n.\r\r\nb\r"), None);
    assert_eq!(e.scan(b"\n."), None);
    assert_eq!(e.scan(b"\r\nrest"), Some(2));
    let mut e = EndOfData::default();
    assert_eq!(e.scan(b"x\n.\nx\r.\r\n"), None);
    assert_eq!(e.scan(b"\r\n\r\n.\r\n"), Some(7));
}

#[tokio::test]
async fn too_many_bad_commands_end_the_session() {
    let mut h = start_opts(Opts {
        smtp: "max_errors = 3",
        ..Default::default()
    })
    .await;
    let c = &mut h.client;
    c.cmd("FOO", "500").await;
    c.cmd("BAR", "500").await;
    c.raw(b"BAZ\r\n", "500 5.5.2").await;
    let last = c.reply().await;
    assert!(last.starts_with("421 4.7.0"), "{last}");
    h.task.await.unwrap();
}

mod fuzz {
    //! Random input into a real session: it never panics, answers every complete line, and
    //! ends; memory stays bounded by the line and message limits whatever is sent.
    use proptest::prelude::*;

    use super::*;

    fn chunk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            Just(b"EHLO x\r\n".to_vec()),
            Just(b"MAIL FROM:<a@b.test>\r\n".to_vec()),
            Just(b"RCPT TO:<u@example.test>\r\n".to_vec()),
            Just(b"DATA\r\n".to_vec()),
            Just(b"\r\n.\r\n".to_vec()),
            Just(b"BDAT 10\r\n".to_vec()),
            Just(b"STARTTLS\r\n".to_vec()),
            Just(vec![b'A'; 5000]),
            Just(b"\n.\n".to_vec()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn random_input_never_panics(chunks in proptest::collection::vec(chunk(), 1..20)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut h = start().await;
                let (mut r, mut w) = (h.client.r, h.client.w);
                let reader = tokio::spawn(async move {
                    let mut sink = Vec::new();
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut r, &mut sink).await;
                    sink
                });
                for c in chunks {
                    if w.write_all(&c).await.is_err() {
                        break; // the server hung up (e.g. too many errors)
                    }
                }
                let _ = w.write_all(b"\r\nQUIT\r\n").await;
                let _ = w.shutdown().await;
                let session = tokio::time::timeout(Duration::from_secs(10), &mut h.task).await;
                prop_assert!(session.is_ok(), "the session did not end");
                prop_assert!(session.unwrap().is_ok(), "the session panicked");
                let out = reader.await.unwrap();
                // every reply line is `NNN` + space or dash
                for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    prop_assert!(line.len() >= 4 && line[..3].iter().all(u8::is_ascii_digit), "bad line {line:?}");
                }
                Ok(())
            })?;
        }
    }
}
