//! Addresses and domains, exactly (issue 14, class 5), against the real mx-pod and a real
//! Postfix primary:
//! - an internationalised domain is one route whatever its spelling (U-label or A-label, any
//!   case): holds, listings, flushes, metrics and `replay.auto` all see `xn--bcher-kva.example`;
//! - a quoted local part reaches the primary exactly as the sender wrote it;
//! - a UTF-8 address needs `SMTPUTF8` (`553 5.6.7` without it); with it, the primary gets it
//!   with SMTPUTF8, and a primary that does not offer SMTPUTF8 gets nothing: the recipient
//!   bounces with `5.6.7 primary does not support SMTPUTF8`;
//! - `mx-pod check-config` and `mx-pod serve` refuse impossible primaries, `max_bytes = 0` and
//!   a token file others may read.

use std::{path::Path, process::Command, time::Duration};

use backupmx_tests::{
    MxPod, MxPodConfig, Primary, Sink, message, mxpod_bin,
    realparts::{Smtp, rejected},
    send, state_dir, wait_for, write_token_file,
};
use reqwest::Method;
use serde_json::json;

const IDN: &str = "xn--bcher-kva.example";

/// A message with UTF-8 in its Subject (RFC 6532), tagged for the maildir.
fn utf8_message(tag: &str) -> Vec<u8> {
    format!(
        "From: <s@sender.test>\r\nTo: <jürgen@example.test>\r\nSubject: grüße {tag}\r\nMessage-ID: <{tag}@test>\r\n\r\n{tag}\r\n"
    )
    .into_bytes()
}

/// One SMTPUTF8 transaction over a raw connection; the reply to the end of DATA.
async fn send_utf8(pod: &MxPod, from: &str, to: &[&str], data: &[u8]) -> String {
    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    c.expect(&format!("MAIL FROM:<{from}> SMTPUTF8"), "250 2.1.0")
        .await;
    for t in to {
        c.expect(&format!("RCPT TO:<{t}>"), "250 2.1.5").await;
    }
    let r = c.data(data).await;
    c.quit().await;
    r
}

/// How many times the primary's maillog says it delivered to `address` (its virtual(8) lines;
/// smtpd's INFO lines name recipients too, before any delivery).
fn delivered_to(primary: &Primary, address: &str) -> usize {
    primary
        .maillog()
        .matches(&format!("to=<{address}>, relay=virtual"))
        .count()
}

/// Domains of `GET /v1/queue` with their message counts and hold flags.
async fn routes(pod: &MxPod) -> Vec<(String, u64, bool)> {
    let (code, q) = pod.get("/v1/queue").await;
    assert_eq!(code, 200, "{q}");
    q["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["domain"].as_str().unwrap().to_owned(),
                d["messages"].as_u64().unwrap(),
                d["held"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idn_is_one_route_for_holds_listings_metrics_and_auto_replay() {
    let primary = Primary::start_for(&["example.test", "bücher.example", IDN]);
    let mut cfg = MxPodConfig::new(&primary.addr());
    // configured by its U-label; standalone replay that follows the probes
    cfg.domains.push(("bücher.example".into(), primary.addr()));
    cfg.auto = true;
    cfg.workers = 1;
    let pod = MxPod::start(cfg).await;

    // held by a person's spelling through the CLI, before any mail: the one route is held
    let (ok, out) = pod.cli_config(&["queue", "hold", "--domain", "Bücher.EXAMPLE"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("\"domain\": \"{IDN}\"")), "{out}");

    // three spellings of the domain in SMTP
    let r = send_utf8(
        &pod,
        "s@sender.test",
        &["jürgen@bücher.example"],
        &message("idn", 0, 200),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    for (i, to) in [
        (1, "user@xn--bcher-kva.example"),
        (2, "other@XN--BCHER-KVA.Example"),
    ] {
        let sent = send(pod.smtp, "s@sender.test", &[to], &message("idn", i, 200))
            .await
            .unwrap();
        assert!(sent.ok(), "{to}: {sent:?}");
    }
    assert_eq!(
        routes(&pod).await,
        [("example.test".into(), 0, false), (IDN.into(), 3, true)],
        "one route, held"
    );

    // metrics: one series for the domain, under its A-label
    assert_eq!(
        pod.metric(&format!("mxpod_queue_messages{{domain=\"{IDN}\"}}"))
            .await,
        3.0
    );
    let (_, text) = pod.get("/metrics").await;
    assert!(
        !text.as_str().unwrap().contains("bücher"),
        "no U-label series:\n{text}"
    );

    // ?domain= by any spelling lists the route; a non-domain is an error, not an empty list
    for spelling in ["bücher.example", "XN--BCHER-KVA.example", "Bücher.Example"] {
        let (code, list) = pod
            .get(&format!("/v1/queue/messages?domain={spelling}"))
            .await;
        assert_eq!(code, 200, "{spelling}: {list}");
        assert_eq!(list.as_array().unwrap().len(), 3, "{spelling}: {list}");
    }
    let (code, body) = pod
        .get("/v1/queue/messages?domain=b%C3%BCcher..example")
        .await;
    assert_eq!(code, 400, "{body}");
    let (ok, out) = pod.cli_config(&["queue", "list", "--domain", "bücher.example"]);
    assert!(ok && out.contains("jürgen@bücher.example"), "{out}");

    // replay runs (auto: the prober found the primary up) and the hold holds: mail for the
    // other domain is delivered while the IDN's stays
    let sent = send(
        pod.smtp,
        "s@sender.test",
        &["user@example.test"],
        &message("plain", 0, 200),
    )
    .await
    .unwrap();
    assert!(sent.ok(), "{sent:?}");
    wait_for(
        "the example.test message at the primary",
        Duration::from_secs(60),
        || async { delivered_to(&primary, "user@example.test") == 1 },
    )
    .await;
    assert_eq!(routes(&pod).await[1], (IDN.into(), 3, true));

    // a flush by the U-label names the route
    let (code, body) = pod
        .call(
            Method::POST,
            "/v1/queue/flush",
            Some(json!({"domain": "bücher.example"})),
            true,
        )
        .await;
    assert_eq!((code, body["domain"].as_str()), (200, Some(IDN)), "{body}");

    // released by the A-label in upper case: the whole route goes, in every spelling
    let (code, body) = pod
        .call(
            Method::POST,
            "/v1/queue/release",
            Some(json!({"domain": "XN--BCHER-KVA.EXAMPLE"})),
            true,
        )
        .await;
    assert_eq!(code, 200, "{body}");
    pod.wait_empty(Duration::from_secs(60)).await;
    let log = primary.maillog();
    for to in ["jürgen@bücher.example", "user@xn--bcher-kva.example"] {
        assert_eq!(delivered_to(&primary, to), 1, "{to} at the primary:\n{log}");
    }
    assert_eq!(primary.delivered().len(), 4);
    assert_eq!(
        pod.metric(&format!("mxpod_delivered_total{{domain=\"{IDN}\"}}"))
            .await,
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_local_parts_reach_the_primary_intact() {
    let primary = Primary::start();
    // a bounce (what the dequoted replay earlier caused) goes somewhere the queue can drain to
    let dsn = Sink::start(&[], 0, false).await;
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.workers = 1;
    cfg.dsn_relay = Some(dsn.addr());
    let pod = MxPod::start(cfg).await;
    let quoted = [
        "\"john doe\"@example.test",
        "\"john..doe\"@example.test",
        "\"x\\\"y\"@example.test",
    ];
    let mut replies = Vec::new();
    for (i, to) in quoted.iter().enumerate() {
        let sent = send(
            pod.smtp,
            "\"s d\"@sender.test",
            &[to],
            &message("quoted", i, 200),
        )
        .await
        .unwrap();
        replies.push(sent.reply);
    }
    // an `@` inside the quotes is the relay trick it always was: refused in the dialogue
    let sent = send(
        pod.smtp,
        "s@sender.test",
        &["\"a@b\"@example.test"],
        &message("quoted", 9, 200),
    )
    .await
    .unwrap();
    assert!(sent.reply.starts_with("550 5.7.1"), "{sent:?}");

    pod.wait_empty(Duration::from_secs(60)).await;
    let log = primary.maillog();
    for (to, reply) in quoted.iter().zip(&replies) {
        assert!(reply.starts_with("250"), "{to}: {reply}");
        assert_eq!(delivered_to(&primary, to), 1, "{to} at the primary:\n{log}");
    }
    assert!(log.contains("from=<\"s d\"@sender.test>"), "{log}");
    assert_eq!(primary.delivered().len(), 3);
    assert_eq!(
        pod.metric("mxpod_bounced_total{reason=\"rejected\"}").await,
        0.0,
        "nothing bounced:\n{}",
        pod.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_ascii_address_without_smtputf8_is_refused_553_5_6_7() {
    let sink = Sink::start(&[], 0, false).await;
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.domains.push(("bücher.example".into(), sink.addr()));
    let pod = MxPod::start(cfg).await;
    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<jürgen@sender.test>", "553 5.6.7")
        .await;
    c.expect("MAIL FROM:<s@sender.test>", "250").await;
    c.expect("RCPT TO:<jürgen@example.test>", "553 5.6.7").await;
    c.expect("RCPT TO:<user@bücher.example>", "553 5.6.7").await;
    c.expect("RCPT TO:<user@xn--bcher-kva.example>", "250")
        .await;
    c.quit().await;
    assert_eq!(rejected(&pod, "non_ascii_address").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_goes_to_a_primary_that_offers_it_and_bounces_at_one_that_does_not() {
    let primary = Primary::start();
    let dsn = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.workers = 1;
    cfg.dsn_relay = Some(dsn.addr());
    let pod = MxPod::start(cfg).await;

    // Postfix at compatibility level 3.6 offers SMTPUTF8
    let r = send_utf8(
        &pod,
        "s@sender.test",
        &["jürgen@example.test"],
        &utf8_message("offered"),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    pod.wait_empty(Duration::from_secs(60)).await;
    assert_eq!(delivered_to(&primary, "jürgen@example.test"), 1);
    let got = primary.delivered();
    assert_eq!(got.len(), 1);
    assert!(String::from_utf8_lossy(&got[0]).contains("Subject: grüße offered"));

    // the same primary without SMTPUTF8: the UTF-8 recipient bounces, the ASCII one is delivered
    primary.reconfigure(&["smtputf8_enable=no".into()]);
    let addr = primary.addr();
    wait_for(
        "the primary to stop offering SMTPUTF8",
        Duration::from_secs(30),
        || async {
            match mx_pod::outbound::SmtpClient::connect(&addr, "probe.test", Duration::from_secs(5))
                .await
            {
                Ok(c) => {
                    let offered = c.caps.smtputf8;
                    c.quit().await;
                    !offered
                }
                Err(_) => false,
            }
        },
    )
    .await;
    let r = send_utf8(
        &pod,
        "s@sender.test",
        &["jürgen@example.test", "user@example.test"],
        &message("notoffered", 0, 200),
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    pod.wait_empty(Duration::from_secs(60)).await;
    let log = primary.maillog();
    assert_eq!(
        delivered_to(&primary, "jürgen@example.test"),
        1,
        "not sent again:\n{log}"
    );
    assert_eq!(delivered_to(&primary, "user@example.test"), 1, "{log}");
    // what the old replay did: sent without SMTPUTF8, and Postfix delivered a mangled mailbox
    // (logged as `to=<j??rgen@example.test>`)
    assert_eq!(primary.delivered().len(), 2, "nothing more:\n{log}");
    let dsns = dsn.dumped();
    assert_eq!(dsns.len(), 1, "one DSN");
    let text = String::from_utf8_lossy(&dsns[0].1).into_owned();
    for want in [
        "Status: 5.6.7",
        "Diagnostic-Code: smtp; 553 5.6.7 primary does not support SMTPUTF8",
        "jürgen@example.test",
    ] {
        assert!(text.contains(want), "{want:?} in the DSN:\n{text}");
    }
    assert!(
        !text.contains("Final-Recipient: rfc822; user@example.test"),
        "{text}"
    );
}

/// `mx-pod ARGS --config PATH`: exit status and stdout+stderr.
fn mx_pod(args: &[&str], config: &Path) -> (bool, String) {
    let out = Command::new(mxpod_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("run mx-pod");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_primaries_max_bytes_zero_and_readable_tokens_are_refused_at_start() {
    use std::os::unix::fs::{PermissionsExt, chown};
    backupmx_tests::require_root();
    let dir = state_dir("checkcfg");
    let token = dir.path().join("admin-token");
    write_token_file(&token, "s3cret");
    let config = dir.path().join("mx-pod.toml");
    let write = |primary: &str, queue_extra: &str| {
        std::fs::write(
            &config,
            format!(
                "hostname = \"mx2.example.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[queue]\ndir = \"{}\"\n{queue_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n[[domains]]\nname = \"example.test\"\nprimary = \"{primary}\"\n",
                dir.path().join("queue").display(),
                token.display()
            ),
        )
        .unwrap();
    };

    write("mail.example.test:25", "");
    let (ok, out) = mx_pod(&["check-config"], &config);
    assert!(ok, "the good config passes: {out}");

    for bad in [
        "mail..example.test:25",
        ":25",
        "mail example.test:25",
        "mail_1.example.test:25",
        "mail.example.test",
    ] {
        write(bad, "");
        let (ok, out) = mx_pod(&["check-config"], &config);
        assert!(!ok && out.contains("domains[0].primary"), "{bad}: {out}");
    }
    write("mail.example.test:25", "max_bytes = 0");
    let (ok, out) = mx_pod(&["check-config"], &config);
    assert!(!ok && out.contains("queue.max_bytes"), "{out}");

    write("mail.example.test:25", "");
    let mode =
        |m: u32| std::fs::set_permissions(&token, std::fs::Permissions::from_mode(m)).unwrap();
    for m in [0o644, 0o604, 0o660] {
        mode(m);
        let (ok, out) = mx_pod(&["check-config"], &config);
        assert!(
            !ok && out.contains("admin.token_file") && out.contains(&format!("{m:04o}")),
            "{m:o}: {out}"
        );
    }
    // serve refuses to start on it too, before it opens anything
    mode(0o644);
    let (ok, out) = mx_pod(&["serve"], &config);
    assert!(!ok && out.contains("admin.token_file"), "{out}");
    assert!(!dir.path().join("queue").exists(), "nothing created");

    // the Kubernetes layout: owned by root, readable by the pod's group only
    mode(0o440);
    let (ok, out) = mx_pod(&["check-config"], &config);
    assert!(ok, "root-owned 0440: {out}");
    // the same mode owned by anyone else: the group could be anyone's
    let nobody = Command::new("id").args(["-u", "nobody"]).output().unwrap();
    let nobody: u32 = String::from_utf8_lossy(&nobody.stdout)
        .trim()
        .parse()
        .unwrap();
    chown(&token, Some(nobody), None).unwrap();
    let (ok, out) = mx_pod(&["check-config"], &config);
    assert!(
        !ok && out.contains("admin.token_file"),
        "nobody-owned 0440: {out}"
    );
}
