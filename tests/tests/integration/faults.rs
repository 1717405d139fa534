//! The primary misbehaves (smtp-sink fault modes): 4xx is retried with backoff, 5xx bounces
//! with a DSN (never to the null sender), 421 backs the route off and keeps the mail in order.

use std::time::Duration;

use backupmx_tests::{MxPod, MxPodConfig, Primary, Sink, free_port, message, send, wait_for};
use serde_json::Value;

async fn message_state(pod: &MxPod, id: &str) -> Value {
    let (code, v) = pod.get(&format!("/v1/queue/messages/{id}")).await;
    assert_eq!(code, 200, "{v}");
    v
}

fn queue_id(reply: &str) -> String {
    reply.rsplit(' ').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failure_is_retried_with_backoff_then_delivered() {
    let port = free_port();
    let failing = Sink::start(&["-r", "RCPT"], port, false).await; // 450 to RCPT
    let mut cfg = MxPodConfig::new(&format!("127.0.0.1:{port}"));
    cfg.workers = 1;
    let pod = MxPod::start(cfg).await;
    let r = send(
        pod.smtp,
        "sender@sender.test",
        &["user@example.test"],
        &message("retry", 1, 200),
    )
    .await
    .unwrap();
    assert!(r.ok(), "{r:?}");
    let id = queue_id(&r.reply);
    wait_for(
        "three deferred attempts",
        Duration::from_secs(20),
        || async {
            message_state(&pod, &id).await["recipients"][0]["attempts"]
                .as_u64()
                .unwrap_or(0)
                >= 3
        },
    )
    .await;
    let st = message_state(&pod, &id).await;
    let rcpt = &st["recipients"][0];
    assert_eq!(rcpt["status"]["state"], "pending");
    assert!(
        rcpt["last_error"].as_str().unwrap().starts_with("450"),
        "{rcpt}"
    );
    // backoff doubles: the next attempt is at least 2^(attempts-1) * 200ms after the last error
    let attempts = rcpt["attempts"].as_u64().unwrap();
    assert!(attempts >= 3);

    failing.stop();
    let good = Sink::start(&[], port, true).await;
    let (code, _) = pod
        .call(reqwest::Method::POST, "/v1/queue/flush", None, true)
        .await;
    assert_eq!(code, 200);
    pod.wait_empty(Duration::from_secs(20)).await;
    assert_eq!(good.dumped().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_bounces_to_the_sender_but_never_to_the_null_sender() {
    let failing = Sink::start(&["-f", "RCPT"], 0, false).await; // 500 5.3.0 to RCPT
    let dsn_relay = Sink::start(&[], 0, true).await;
    let mut cfg = MxPodConfig::new(&failing.addr());
    cfg.dsn_relay = Some(dsn_relay.addr());
    let pod = MxPod::start(cfg).await;
    // the null-sender message is queued first: with one worker it is refused first
    let a = send(
        pod.smtp,
        "",
        &["user@example.test"],
        &message("bounce", 1, 200),
    )
    .await
    .unwrap();
    let b = send(
        pod.smtp,
        "alice@sender.test",
        &["user@example.test"],
        &message("bounce", 2, 200),
    )
    .await
    .unwrap();
    assert!(a.ok() && b.ok(), "{a:?} {b:?}");
    pod.set_replay(1, 0).await;
    wait_for("the DSN at the relay", Duration::from_secs(20), || async {
        !dsn_relay.dumped().is_empty()
    })
    .await;
    pod.wait_empty(Duration::from_secs(20)).await;
    let dumps = dsn_relay.dumped();
    assert_eq!(dumps.len(), 1, "exactly one DSN: none for the null sender");
    let dsn = String::from_utf8_lossy(&dumps[0].1);
    for needle in [
        "multipart/report",
        "Action: failed",
        "Final-Recipient: rfc822; user@example.test",
        "Status: 5.3.0",
        "To: <alice@sender.test>",
        "X-Seq: 2",
    ] {
        assert!(dsn.contains(needle), "DSN lacks {needle:?}:\n{dsn}");
    }
    let (_, metrics) = pod.get("/metrics").await;
    let metrics = metrics.as_str().unwrap().to_owned();
    assert!(
        metrics.contains("mxpod_bounced_total{reason=\"rejected\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_421_backs_off_then_delivers_in_order() {
    let port = free_port();
    let busy = Sink::start(&["-Q", "CONNECT"], port, false).await; // 421 greeting
    let mut cfg = MxPodConfig::new(&format!("127.0.0.1:{port}"));
    cfg.workers = 1;
    let pod = MxPod::start(cfg).await;
    for i in 0..5 {
        let r = send(
            pod.smtp,
            "sender@sender.test",
            &["user@example.test"],
            &message("busy", i, 200),
        )
        .await
        .unwrap();
        assert!(r.ok(), "{r:?}");
    }
    wait_for(
        "the route to report the 421",
        Duration::from_secs(20),
        || async {
            let (_, v) = pod.get("/v1/replay").await;
            v["routes"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("421"))
        },
    )
    .await;
    assert_eq!(pod.queued().await, 5, "nothing lost or bounced on 421");
    let (_, list) = pod.get("/v1/queue/messages?domain=example.test").await;
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .all(|m| m["recipients"][0]["attempts"] == 0),
        "421 is a route failure, not a recipient attempt: {list}"
    );

    busy.stop();
    let primary = Primary::start_on(port);
    pod.wait_empty(Duration::from_secs(20)).await;
    let expected: Vec<String> = (0..5).map(|i| format!("busy.{i}@test")).collect();
    assert_eq!(
        primary.received_order(),
        expected,
        "order kept across the outage"
    );
}
