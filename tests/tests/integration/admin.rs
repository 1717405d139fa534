//! The admin API and the `mx-pod queue` CLI: shapes, token checks (every `/v1` call needs the
//! token: listings hold senders, recipients and client addresses), hold/release/flush/delete.

use std::time::Duration;

use backupmx_tests::{MxPod, MxPodConfig, Sink, message, send, wait_for};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_cli_and_metrics() {
    let sink = Sink::start(&[], 0, true).await;
    let pod = MxPod::start(MxPodConfig::new(&sink.addr())).await;
    for i in 0..3 {
        assert!(
            send(
                pod.smtp,
                "s@sender.test",
                &["user@example.test"],
                &message("admin", i, 300)
            )
            .await
            .unwrap()
            .ok()
        );
    }
    let relayed = send(
        pod.smtp,
        "s@sender.test",
        &["x@elsewhere.test"],
        &message("admin", 9, 300),
    )
    .await
    .unwrap();
    assert!(relayed.reply.starts_with("550 5.7.1"), "{relayed:?}");

    // every /v1 call needs the token, reads included; only health, readiness and metrics are open
    let id = "0000000000000001";
    for (m, p) in [
        (Method::GET, "/v1/queue".to_owned()),
        (Method::GET, "/v1/queue/messages".to_owned()),
        (
            Method::GET,
            "/v1/queue/messages?domain=example.test".to_owned(),
        ),
        (Method::GET, format!("/v1/queue/messages/{id}")),
        (Method::GET, "/v1/replay".to_owned()),
    ] {
        let (code, body) = pod.call(m.clone(), &p, None, false).await;
        assert_eq!(code, 401, "{m} {p} without the token: {body}");
        assert!(
            !body.to_string().contains("s@sender.test"),
            "no data in the refusal: {body}"
        );
    }
    for p in ["/healthz", "/readyz", "/metrics"] {
        let (code, body) = pod.call(Method::GET, p, None, false).await;
        assert_eq!(code, 200, "{p} is open: {body}");
    }
    let (_, open_metrics) = pod.call(Method::GET, "/metrics", None, false).await;
    let open_metrics = open_metrics.as_str().unwrap();
    for private in ["s@sender.test", "user@example.test", "127.0.0.1", "@"] {
        assert!(
            !open_metrics.contains(private),
            "/metrics must carry no addresses ({private:?}):\n{open_metrics}"
        );
    }
    let (code, q) = pod.get("/v1/queue").await;
    assert_eq!(code, 200);
    assert_eq!(q["messages"], 3);
    assert_eq!(q["domains"][0]["domain"], "example.test");
    assert_eq!(q["domains"][0]["messages"], 3);
    assert!(
        q["domains"][0]["oldest_age_seconds"].is_u64()
            && q["domains"][0]["bytes"].as_u64().unwrap() > 900
    );
    assert_eq!(pod.get("/healthz").await.0, 200);
    assert_eq!(pod.get("/readyz").await.0, 200);

    // mutating calls need the token
    for (m, p) in [
        (Method::PUT, "/v1/replay"),
        (Method::POST, "/v1/queue/hold"),
        (Method::POST, "/v1/queue/flush"),
        (Method::POST, "/v1/drain"),
    ] {
        let (code, body) = pod.call(m.clone(), p, Some(json!({})), false).await;
        assert_eq!(code, 401, "{m} {p}: {body}");
    }
    let (code, _) = pod
        .call(
            Method::DELETE,
            "/v1/queue/messages/0000000000000001",
            None,
            false,
        )
        .await;
    assert_eq!(code, 401);

    // CLI: list, show, hold, release, delete
    let (ok, out) = pod.cli_config(&["queue", "list"]);
    assert!(ok && out.contains("-- 3 message(s)"), "{out}");
    let (_, list) = pod.get("/v1/queue/messages").await;
    let first = list[0]["id"].as_str().unwrap().to_owned();
    let last = list[2]["id"].as_str().unwrap().to_owned();
    let (ok, out) = pod.cli_config(&["queue", "show", &first]);
    assert!(ok && out.contains("\"sender\": \"s@sender.test\""), "{out}");
    let (ok, out) = pod.cli_config(&["queue", "hold", "--domain", "example.test"]);
    assert!(ok, "{out}");
    assert_eq!(pod.get("/v1/queue").await.1["domains"][0]["held"], true);
    pod.set_replay(2, 0).await;
    let (ok, out) = pod.cli_config(&["queue", "delete", &last]);
    assert!(ok, "{out}");
    assert_eq!(
        pod.queued().await,
        2,
        "held mail is not delivered; the deleted one is gone"
    );
    let (ok, out) = pod.cli_config(&["queue", "release", "--domain", "example.test"]);
    assert!(ok, "{out}");
    pod.wait_empty(Duration::from_secs(20)).await;
    wait_for("two deliveries", Duration::from_secs(5), || async {
        sink.dumped().len() == 2
    })
    .await;
    let (ok, out) = pod.cli_config(&["queue", "list"]);
    assert!(ok && out.contains("Mail queue is empty"), "{out}");
    for args in [["queue", "list"], ["queue", "flush"]] {
        let mut args = args.to_vec();
        args.extend(["--admin", &pod.admin]);
        let (ok, out) = pod.cli(&args);
        assert!(
            !ok && out.contains("401") && out.contains("give --token-file or --config"),
            "{args:?} without a token: {out}"
        );
    }

    // GET/PUT replay
    let (code, r) = pod
        .call(
            Method::PUT,
            "/v1/replay",
            Some(json!({"workers": 3, "rate_per_second": 7})),
            true,
        )
        .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        (r["workers"].as_u64(), r["rate_per_second"].as_u64()),
        (Some(3), Some(7))
    );
    let (code, r) = pod
        .call(Method::PUT, "/v1/replay", Some(json!({"wrokers": 3})), true)
        .await;
    assert_eq!(code, 400, "{r}");

    // metrics: every name from the design
    let (_, m) = pod.get("/metrics").await;
    let m = m.as_str().unwrap();
    for name in [
        "mxpod_queue_messages{domain=\"example.test\"} 0",
        "mxpod_queue_bytes{domain=\"example.test\"}",
        "mxpod_queue_oldest_age_seconds{domain=\"example.test\"}",
        "mxpod_accepted_total 3",
        "mxpod_rejected_total{reason=\"relay\"} 1",
        "mxpod_delivered_total{domain=\"example.test\"} 2",
        "mxpod_deferred_total",
        "mxpod_bounced_total",
        "mxpod_replay_workers 3",
        "mxpod_smtp_sessions",
    ] {
        assert!(m.contains(name), "metrics lack {name:?}:\n{m}");
    }

    // drain: readiness goes false and new SMTP sessions are refused
    let (code, _) = pod.call(Method::POST, "/v1/drain", None, true).await;
    assert_eq!(code, 200);
    assert_eq!(pod.get("/readyz").await.0, 503);
    let r = send(
        pod.smtp,
        "s@sender.test",
        &["user@example.test"],
        &message("admin", 5, 100),
    )
    .await
    .unwrap();
    assert!(r.reply.starts_with("421 4.3.2"), "{r:?}");
}
