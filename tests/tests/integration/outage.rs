//! The main scenario: the primary goes down, mail queues on the backup, the primary comes back
//! and gets every message once, in arrival order, unchanged but for our `Received:` header.

use std::time::Duration;

use backupmx_tests::{MxPod, MxPodConfig, Primary, lf, message, run, seq_of};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_queue_recovery_delivers_once_in_order() {
    let mut primary = Primary::start();
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.auto = true; // standalone: mx-pod probes the primary itself
    cfg.workers = 1; // strict arrival order
    let pod = MxPod::start(cfg).await;

    primary.down();
    let n = 20;
    let dir = tempfile::tempdir().unwrap();
    let mut sent = Vec::new();
    for i in 0..n {
        let msg = message("outage", i, 600);
        let path = dir.path().join(format!("{i}.eml"));
        // swaks ends DATA with its own CRLF before the dot: give it the message without its last
        std::fs::write(&path, &msg[..msg.len() - 2]).unwrap();
        let (ok, out) = run(
            "swaks",
            &[
                "--server",
                &pod.smtp.to_string(),
                "--from",
                "sender@sender.test",
                "--to",
                "user@example.test",
                "--helo",
                "client.test",
                "--data",
                &format!("@{}", path.display()),
            ],
        );
        assert!(ok, "swaks #{i} failed:\n{out}");
        assert!(
            out.contains("<-  250 2.0.0 Ok: queued as"),
            "swaks #{i}:\n{out}"
        );
        sent.push(msg);
    }
    assert_eq!(
        pod.queued().await,
        n as u64,
        "all held while the primary is down"
    );
    let (ok, listing) = pod.cli(&[
        "queue",
        "list",
        "--config",
        pod.config_path.to_str().unwrap(),
    ]);
    assert!(ok, "{listing}");
    assert!(listing.contains(&format!("-- {n} message(s)")), "{listing}");
    assert_eq!(
        listing.matches("user@example.test (pending").count(),
        n,
        "{listing}"
    );

    primary.up();
    pod.wait_empty(Duration::from_secs(60)).await;
    backupmx_tests::wait_for(
        "Postfix to deliver every message",
        Duration::from_secs(30),
        || async { primary.delivered().len() >= n },
    )
    .await;

    let delivered = primary.delivered();
    assert_eq!(delivered.len(), n, "each message exactly once");
    for m in &delivered {
        let seq = seq_of(m).expect("X-Seq present");
        let original = lf(&sent[seq]);
        assert!(
            m.ends_with(&original),
            "message {seq}: the original bytes must arrive unchanged"
        );
        let head = &m[..m.len() - original.len()];
        let head = String::from_utf8_lossy(head);
        let received = head.lines().filter(|l| l.starts_with("Received:")).count();
        assert_eq!(
            received, 2,
            "ours and the primary's Received: only:\n{head}"
        );
        assert!(
            head.contains("by mx2.example.test (mx-pod) with ESMTP id"),
            "{head}"
        );
    }
    let order = primary.received_order();
    let expected: Vec<String> = (0..n).map(|i| format!("outage.{i}@test")).collect();
    assert_eq!(
        order, expected,
        "the primary received the mail in arrival order"
    );
}
