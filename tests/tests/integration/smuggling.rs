//! SMTP smuggling (SEC Consult, 2023) against a real mx-pod: every published end-of-data
//! look-alike, alone and hiding a second transaction before the real `<CRLF>.<CRLF>`, gets
//! exactly one reply (`550 5.6.11`), nothing is queued, and nothing reaches the primary; a clean
//! message in the same session still goes through, alone.

use std::time::Duration;

use backupmx_tests::{
    MxPod, MxPodConfig, Sink,
    realparts::{Smtp, metric, rejected},
    wait_for,
};

/// End-of-data look-alikes that some receivers honour.
const FAKE_ENDS: &[(&str, &[u8])] = &[
    ("LF . LF", b"\n.\n"),
    ("CR . CR", b"\r.\r"),
    ("CRLF . CR", b"\r\n.\r"),
    ("LF . CRLF", b"\n.\r\n"),
    ("CR . CRLF", b"\r.\r\n"),
    ("CRLF . LF", b"\r\n.\n"),
    ("LF . CR", b"\n.\r"),
];

/// A second transaction hidden after the fake end; its own end is the real `<CRLF>.<CRLF>`.
const INJECTED: &[u8] = b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\nSubject: injected\r\nMessage-ID: <injected@evil.test>\r\n\r\nx";

/// What is sent after `354`: a message, the fake end, then either more text or the injected
/// transaction, then the real end.
fn payload(fake_end: &[u8], inject: bool) -> Vec<u8> {
    let mut p = b"From: <alice@sender.test>\r\nTo: <victim@example.test>\r\nSubject: smuggle\r\nMessage-ID: <smuggle@sender.test>\r\n\r\nfirst part".to_vec();
    p.extend_from_slice(fake_end);
    if inject {
        p.extend_from_slice(INJECTED);
    } else {
        p.extend_from_slice(b"second part");
    }
    p.extend_from_slice(b"\r\n.\r\n");
    p
}

/// Sends one smuggling attempt in the session; returns the reply to it and every further reply
/// that came before NOOP's own (there must be none: each would be a command run from inside the
/// message).
async fn attempt(c: &mut Smtp, payload: &[u8]) -> (String, Vec<String>) {
    c.expect("MAIL FROM:<alice@sender.test>", "250").await;
    c.expect("RCPT TO:<victim@example.test>", "250").await;
    c.expect("DATA", "354").await;
    c.write(payload).await;
    let reply = c.reply().await;
    c.write(b"NOOP\r\n").await;
    let mut extra = Vec::new();
    loop {
        let r = c.reply().await;
        if r == "250 2.0.0 OK" {
            return (reply, extra);
        }
        extra.push(r);
        assert!(extra.len() < 20, "runaway replies: {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_end_of_data_is_refused_and_nothing_smuggled_is_delivered() {
    let sink = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.workers = 1; // whatever gets queued goes to the sink at once
    let pod = MxPod::start(cfg).await;

    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    let mut table = Vec::new();
    for (name, end) in FAKE_ENDS {
        for inject in [false, true] {
            let (reply, extra) = attempt(&mut c, &payload(end, inject)).await;
            table.push((*name, inject, reply, extra));
        }
    }
    for (name, inject, reply, extra) in &table {
        println!(
            "{name:<10} {:<9} {reply} {extra:?}",
            if *inject { "injected" } else { "alone" }
        );
    }
    for (name, inject, reply, extra) in &table {
        assert!(
            reply.starts_with("550 5.6.11") && extra.is_empty(),
            "{name} (injected: {inject}): {reply}, then {extra:?}"
        );
    }
    assert_eq!(pod.queued().await, 0, "nothing queued");
    assert_eq!(
        metric(&pod, "mxpod_accepted_total").await,
        0,
        "nothing accepted (so nothing for the replay worker either)"
    );
    assert_eq!(rejected(&pod, "bare_line_ending").await, table.len() as u64);

    // a clean message in the same session
    let r = c
        .mail(
            "alice@sender.test",
            &["victim@example.test"],
            b"From: <alice@sender.test>\r\nSubject: clean\r\nMessage-ID: <clean@sender.test>\r\n\r\nclean body\r\n",
        )
        .await;
    assert!(r.starts_with("250 2.0.0"), "clean message: {r}");
    c.quit().await;

    pod.wait_empty(Duration::from_secs(30)).await;
    wait_for(
        "the clean message in the sink",
        Duration::from_secs(20),
        || async { !sink.dumped().is_empty() },
    )
    .await;
    let dumps = sink.dumped();
    assert_eq!(dumps.len(), 1, "exactly one message reached the primary");
    let m = String::from_utf8_lossy(&dumps[0].1);
    assert!(m.contains("<clean@sender.test>"), "{m}");
    for bad in ["injected", "evil@evil.test", "smuggle"] {
        assert!(!m.contains(bad), "{bad} reached the primary: {m}");
    }
}

/// `<CRLF>.<CR><CR><LF>` is no end of data either (RFC 5321 4.1.1.4: only `<CRLF>.<CRLF>`).
///
/// Regression guard: smtp-proto 0.2.5's `DataReceiver` ends DATA at a line starting with "."
/// whose last CR is followed by LF, i.e. also at `<CRLF>.<CR><CR><LF>`; when the session relied
/// on it, everything after ran as SMTP commands and an injected transaction was delivered. The
/// session now finds the end of data itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_cr_cr_lf_does_not_end_data() {
    let sink = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.workers = 1;
    let pod = MxPod::start(cfg).await;

    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    let mut table = Vec::new();
    for inject in [false, true] {
        let (reply, extra) = attempt(&mut c, &payload(b"\r\n.\r\r\n", inject)).await;
        println!("injected: {inject}: {reply}, then {extra:?}");
        table.push((inject, reply, extra));
    }
    c.quit().await;
    let accepted = metric(&pod, "mxpod_accepted_total").await;
    pod.wait_empty(Duration::from_secs(30)).await;
    let delivered = sink.dumped().len();
    println!(
        "accepted: {accepted}; delivered: {:?}",
        sink.dumped()
            .iter()
            .map(|(_, m)| String::from_utf8_lossy(m).into_owned())
            .collect::<Vec<_>>()
    );
    for (inject, reply, extra) in &table {
        assert!(
            reply.starts_with("550 5.6.11") && extra.is_empty(),
            "injected: {inject}: {reply}, then {extra:?}"
        );
    }
    assert_eq!(accepted, 0, "nothing accepted");
    assert_eq!(delivered, 0, "nothing delivered: {:?}", sink.dumped());
}
