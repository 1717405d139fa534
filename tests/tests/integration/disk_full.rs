//! A full queue answers `452 4.3.1`, keeps serving, loses nothing, and accepts again once
//! replay has freed space: both for the `max_bytes` limit and for a really full filesystem.

use std::{collections::BTreeSet, process::Command, time::Duration};

use backupmx_tests::{
    MxPod, MxPodConfig, Primary, Sent, message, send, seq_of, state_dir, wait_for,
};

/// `message(tag, seq, size)` from sender@sender.test to user@example.test.
async fn send_seq(pod: &MxPod, tag: &str, seq: usize, size: usize) -> Sent {
    let to = ["user@example.test"];
    let m = message(tag, seq, size);
    send(pod.smtp, "sender@sender.test", &to, &m).await.unwrap()
}

/// Sends numbered messages until one is refused; returns the accepted seqs and the refusal.
async fn fill(pod: &MxPod, tag: &str, size: usize, max: usize) -> (BTreeSet<usize>, String) {
    let mut acked = BTreeSet::new();
    for seq in 0..max {
        let r = send_seq(pod, tag, seq, size).await;
        if r.ok() {
            acked.insert(seq);
        } else {
            return (acked, r.reply);
        }
    }
    panic!("the queue never filled after {max} messages");
}

async fn drain_and_check(pod: &MxPod, primary: &Primary, acked: &BTreeSet<usize>) {
    pod.set_replay(2, 0).await;
    pod.wait_empty(Duration::from_secs(60)).await;
    wait_for(
        "every acknowledged message at the primary",
        Duration::from_secs(30),
        || async {
            let got: BTreeSet<usize> = primary
                .delivered()
                .iter()
                .filter_map(|m| seq_of(m))
                .collect();
            acked.is_subset(&got)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bytes_gives_452_then_accepts_again_after_replay() {
    let primary = Primary::start();
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.max_bytes = "64KiB".into();
    let pod = MxPod::start(cfg).await;
    let (acked, refusal) = fill(&pod, "quota", 4096, 100).await;
    assert!(refusal.starts_with("452 4.3.1"), "{refusal}");
    assert!(acked.len() >= 10, "{} accepted before full", acked.len());
    // still serving: the refusal is per message, the server is fine
    let again = send(
        pod.smtp,
        "sender@sender.test",
        &["user@example.test"],
        &message("quota", 999, 4096),
    )
    .await
    .unwrap();
    assert_eq!(again.code(), 452, "{again:?}");
    drain_and_check(&pod, &primary, &acked).await;
    accepts_again(&pod, "quota", 1000, 4096).await;
}

/// Once replay has freed space, a message `message(tag, seq, size)` is accepted again.
async fn accepts_again(pod: &MxPod, tag: &str, seq: usize, size: usize) {
    let after = send_seq(pod, tag, seq, size).await;
    assert!(
        after.ok(),
        "space freed, accepting again: {after:?}\n{}",
        pod.log_text()
    );
}

/// Unmounts the small filesystem when the test ends, however it ends.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_filesystem_gives_452_then_accepts_again_after_replay() {
    let primary = Primary::start();
    let dir = state_dir("fullfs");
    let queue_dir = dir.path().join("queue");
    std::fs::create_dir_all(&queue_dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=768k,mode=0755", "tmpfs"])
        .arg(&queue_dir)
        .status()
        .expect("run mount");
    assert!(
        ok.success(),
        "mounting a small tmpfs for the full-disk test failed (needs root)"
    );
    let _mount = Mount(queue_dir.clone());
    let mut cfg = MxPodConfig::new(&primary.addr());
    cfg.queue_extra = "segment_size = \"64KiB\"".into();
    let pod = MxPod::start_with_queue_dir(dir, queue_dir, cfg).await;
    let (acked, refusal) = fill(&pod, "enospc", 8192, 500).await;
    assert!(refusal.starts_with("452 4.3.1"), "{refusal}");
    assert!(
        acked.len() >= 20,
        "{} accepted before the disk filled",
        acked.len()
    );
    assert!(
        pod.log_text().contains("queue write failed"),
        "the failure is logged"
    );
    drain_and_check(&pod, &primary, &acked).await;
    accepts_again(&pod, "enospc", 9999, 8192).await;
}
