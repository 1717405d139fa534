//! Start, stop and restart: SIGTERM drains gracefully, a restart rebuilds the queue from disk,
//! configuration mistakes are reported precisely.

use std::time::Duration;

use backupmx_tests::{
    MxPod, MxPodConfig, Primary, Sink, message, mxpod_bin, realparts::Smtp, send, state_dir,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_sessions_finishes_open_ones_and_exits_0() {
    let sink = Sink::start(&[], 0, false).await;
    let mut pod = MxPod::start(MxPodConfig::new(&sink.addr())).await;
    let mut c = Smtp::connect(pod.smtp).await;
    c.write(b"HELO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.test>\r\n")
        .await;
    for _ in 0..3 {
        assert!(c.reply().await.starts_with("250"));
    }
    pod.sigterm();
    // a new connection is told to come back later
    backupmx_tests::wait_for(
        "new connections to get 421 4.3.2",
        Duration::from_secs(10),
        || async {
            Smtp::open(pod.smtp, b"")
                .await
                .is_ok_and(|s| s.greeting.starts_with("421 4.3.2"))
        },
    )
    .await;
    // the session in flight finishes its message
    assert!(
        c.data(b"Subject: late\r\n\r\nhi\r\n")
            .await
            .starts_with("250 2.0.0")
    );
    assert!(
        c.reply().await.starts_with("421 4.3.2"),
        "then it is closed"
    );
    let status = pod.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status}");
    // the message accepted during shutdown is on disk
    pod.restart().await;
    assert_eq!(pod.queued().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_the_queue_in_order() {
    let primary = Primary::start();
    let mut pod = MxPod::start(MxPodConfig::new(&primary.addr())).await;
    for i in 0..50 {
        assert!(
            send(
                pod.smtp,
                "s@sender.test",
                &["user@example.test"],
                &message("restart", i, 500)
            )
            .await
            .unwrap()
            .ok()
        );
    }
    let (_, before) = pod.get("/v1/queue/messages?limit=1000").await;
    pod.sigterm();
    assert!(pod.wait_exit(Duration::from_secs(30)).await.success());
    pod.restart().await;
    let (_, after) = pod.get("/v1/queue/messages?limit=1000").await;
    let ids = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&before), ids(&after));
    assert_eq!(ids(&after).len(), 50);
    pod.set_replay(1, 0).await;
    pod.wait_empty(Duration::from_secs(30)).await;
    let expected: Vec<String> = (0..50).map(|i| format!("restart.{i}@test")).collect();
    assert_eq!(
        primary.received_order(),
        expected,
        "replayed in arrival order after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_name_the_key_and_line() {
    let dir = state_dir("config");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "hostname = \"mx2.example.test\"\n[queue]\ndir = \"/tmp/x\"\nretension = \"5d\"\n[[domains]]\nname = \"example.test\"\nprimary = \"127.0.0.1:25\"\n").unwrap();
    let out = std::process::Command::new(mxpod_bin())
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("retension") && err.contains("line 4"), "{err}");

    std::fs::write(&bad, "hostname = \"mx2.example.test\"\n[queue]\ndir = \"/tmp/x\"\nmax_bytes = \"8 gigs\"\n[[domains]]\nname = \"example.test\"\nprimary = \"127.0.0.1:25\"\n").unwrap();
    let out = std::process::Command::new(mxpod_bin())
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("8 gigs") && err.contains("line 4"), "{err}");

    // a queue directory that cannot be written is a clear start-up error
    let unwritable = dir.path().join("unwritable.toml");
    std::fs::write(&unwritable, "hostname = \"mx2.example.test\"\n[smtp]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n[queue]\ndir = \"/proc/mx-pod-queue\"\n[[domains]]\nname = \"example.test\"\nprimary = \"127.0.0.1:25\"\n").unwrap();
    let out = std::process::Command::new(mxpod_bin())
        .args(["serve", "--config"])
        .arg(&unwritable)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/proc/mx-pod-queue"), "{err}");

    // a missing queue directory is created
    let pod = MxPod::start_with_queue_dir(
        state_dir("newdir"),
        dir.path().join("a/b/queue"),
        MxPodConfig::new("127.0.0.1:9"),
    )
    .await;
    assert!(pod.queue_dir.join("log").is_dir());
}
