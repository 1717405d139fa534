//! The SMTP front: STARTTLS (swaks against a certificate made with openssl), PROXY protocol v1
//! and v2 (swaks and raw headers; required when configured), and the per-client limits on
//! connections and messages.

use std::time::Duration;

use backupmx_tests::{
    MxPod, MxPodConfig, Sink,
    realparts::{Smtp, header_fields, proxy_v1, rejected, replay_to_sink, self_signed_cert, swaks},
    wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_with_swaks_and_esmtps_in_received() {
    let cert = self_signed_cert();
    let sink = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.smtp_extra.push_str(&format!(
        "[smtp.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.cert.display(),
        cert.key.display()
    ));
    let pod = MxPod::start(cfg).await;

    let mut c = Smtp::connect(pod.smtp).await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(ehlo.contains("250-STARTTLS"), "advertised: {ehlo}");
    c.quit().await;

    let run = swaks(
        pod.smtp,
        &[
            "--tls",
            "--from",
            "alice@sender.test",
            "--to",
            "user@example.test",
            "--header",
            "Subject: over TLS",
            "--header",
            "Message-ID: <tls@test>",
        ],
    );
    assert!(run.success, "swaks --tls failed:\n{}", run.transcript);
    assert!(run.transcript.contains("TLS started"), "{}", run.transcript);
    assert!(
        run.final_reply().starts_with("250 2.0.0 Ok: queued as"),
        "{}",
        run.transcript
    );
    // and one in clear, for contrast
    let run = swaks(
        pod.smtp,
        &[
            "--from",
            "alice@sender.test",
            "--to",
            "user@example.test",
            "--header",
            "Message-ID: <plain@test>",
        ],
    );
    assert!(run.success, "{}", run.transcript);

    let dumps = replay_to_sink(&pod, &sink, 2).await;
    let tls = dumps.iter().find(|d| d.contains("<tls@test>")).unwrap();
    let received = header_fields(tls, "Received");
    assert!(
        received
            .iter()
            .any(|r| r.contains("by mx2.example.test (mx-pod) with ESMTPS id")),
        "{received:#?}"
    );
    let plain = dumps.iter().find(|d| d.contains("<plain@test>")).unwrap();
    let received = header_fields(plain, "Received");
    assert!(
        received
            .iter()
            .any(|r| r.contains("by mx2.example.test (mx-pod) with ESMTP id")),
        "{received:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_configured_starttls_is_neither_offered_nor_done() {
    let pod = MxPod::start(MxPodConfig::new("127.0.0.1:9")).await;
    let mut c = Smtp::connect(pod.smtp).await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    c.expect("STARTTLS", "502 5.5.1").await;
    c.expect("NOOP", "250").await;
    c.quit().await;
    let run = swaks(
        pod.smtp,
        &[
            "--tls",
            "--from",
            "a@sender.test",
            "--to",
            "user@example.test",
        ],
    );
    assert!(
        !run.success,
        "swaks --tls must fail without STARTTLS:\n{}",
        run.transcript
    );
    assert_eq!(pod.queued().await, 0);
}

/// swaks `--proxy-*` arguments presenting `source` as the client (v1 or v2).
fn proxy_args(version: u8, source: &str, pod: &MxPod) -> Vec<String> {
    let family = match version {
        1 => "TCP4",
        _ => "AF_INET",
    };
    let mut a: Vec<String> = [
        "--proxy-version",
        &version.to_string(),
        "--proxy-family",
        family,
        "--proxy-source",
        source,
        "--proxy-source-port",
        "40000",
        "--proxy-dest",
        &pod.smtp.ip().to_string(),
        "--proxy-dest-port",
        &pod.smtp.port().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if version == 2 {
        a.extend(["--proxy-protocol", "STREAM", "--proxy-command", "PROXY"].map(String::from));
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_name_the_client_and_are_required() {
    let sink = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.smtp_extra.push_str("proxy_protocol = true\n");
    let pod = MxPod::start(cfg).await;

    // a client that sends nothing at all: refused once the header is overdue (runs meanwhile)
    let smtp = pod.smtp;
    let silent = tokio::spawn(async move { Smtp::open(smtp, b"").await.map(|c| c.greeting) });

    for (version, source, mid) in [(1u8, "198.51.100.7", "v1"), (2, "198.51.100.8", "v2")] {
        let mut args = proxy_args(version, source, &pod);
        args.extend(
            [
                "--from",
                "alice@sender.test",
                "--to",
                "user@example.test",
                "--header",
                &format!("Message-ID: <{mid}@test>"),
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = swaks(pod.smtp, &args);
        assert!(
            run.success && run.final_reply().starts_with("250 2.0.0"),
            "swaks PROXY v{version}:\n{}\n{}",
            run.transcript,
            pod.log_text()
        );
    }
    // v1 over IPv6, by hand
    let mut c = Smtp::connect_as(pod.smtp, "2001:db8::7").await;
    let ehlo = c.expect("EHLO client.test", "250").await;
    assert!(ehlo.contains("[2001:db8::7]"), "{ehlo}");
    let r = c
        .mail(
            "alice@sender.test",
            &["user@example.test"],
            b"Message-ID: <v1-6@test>\r\nSubject: v6\r\n\r\nhi\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "{r}");
    c.quit().await;

    // plain SMTP without the header
    let c = Smtp::open(pod.smtp, b"EHLO client.test\r\n").await.unwrap();
    assert!(
        c.greeting.starts_with("421 4.7.0"),
        "no PROXY header: {}",
        c.greeting
    );
    // a malformed one
    let c = Smtp::open(pod.smtp, b"PROXY TCP4 not-an-ip 127.0.0.1 1 25\r\n")
        .await
        .unwrap();
    assert!(c.greeting.starts_with("421 4.7.0"), "{}", c.greeting);
    let greeting = silent.await.unwrap().expect("a reply to the silent client");
    assert!(
        greeting.starts_with("421 4.7.0"),
        "silent client: {greeting}"
    );
    assert_eq!(rejected(&pod, "proxy_header").await, 3);

    let dumps = replay_to_sink(&pod, &sink, 3).await;
    for (mid, client) in [
        ("v1", "198.51.100.7"),
        ("v2", "198.51.100.8"),
        ("v1-6", "IPv6:2001:db8::7"), // RFC 5321 address literal
    ] {
        let m = dumps
            .iter()
            .find(|d| d.contains(&format!("<{mid}@test>")))
            .unwrap_or_else(|| panic!("{mid} not delivered"));
        let received = header_fields(m, "Received");
        assert!(
            received.iter().any(|r| r
                .starts_with(&format!("Received: from client.test ([{client}])"))
                && r.contains("(mx-pod)")),
            "{mid}: {received:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_limits_on_connections_and_messages() {
    let mut cfg = MxPodConfig::new("127.0.0.1:9");
    cfg.smtp_extra = "max_connections_per_ip = 2\nmax_messages_per_minute = 3\nmax_recipients_per_minute = 0\nproxy_protocol = true\n".into();
    let pod = MxPod::start(cfg).await;
    let a = "192.0.2.20";

    let c1 = Smtp::connect_as(pod.smtp, a).await;
    let mut c2 = Smtp::connect_as(pod.smtp, a).await;
    let c3 = Smtp::open(pod.smtp, &proxy_v1(a, pod.smtp)).await.unwrap();
    assert!(
        c3.greeting.starts_with("421 4.7.0"),
        "third connection from {a}: {}",
        c3.greeting
    );
    let mut other = Smtp::connect_as(pod.smtp, "192.0.2.21").await;
    other.expect("EHLO client.test", "250").await;

    // a slot frees when a session ends
    c1.quit().await;
    wait_for(
        "a connection slot of 192.0.2.20 to free",
        Duration::from_secs(10),
        || async {
            match Smtp::open(pod.smtp, &proxy_v1(a, pod.smtp)).await {
                Ok(c) if c.greeting.starts_with("220") => {
                    c.quit().await;
                    true
                }
                _ => false,
            }
        },
    )
    .await;

    // three messages per minute: the fourth MAIL is refused
    c2.expect("EHLO client.test", "250").await;
    for _ in 0..3 {
        c2.expect("MAIL FROM:<a@sender.test>", "250").await;
        c2.expect("RSET", "250").await;
    }
    let r = c2.cmd("MAIL FROM:<a@sender.test>").await;
    assert!(r.starts_with("451 4.7.1"), "fourth MAIL: {r}");
    c2.expect("NOOP", "250").await;
    // another client has its own window
    other.expect("MAIL FROM:<b@sender.test>", "250").await;
    c2.quit().await;
    other.quit().await;

    assert_eq!(rejected(&pod, "rate_limited").await, 1);
    assert!(rejected(&pod, "too_many_connections_from_ip").await >= 1);
}
