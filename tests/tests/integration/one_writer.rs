//! One writer per queue directory. A second `mx-pod serve` on a queue that a running server
//! holds, even one configured with other ports, is refused at once: it names the directory and
//! the holder's PID, exits non-zero and changes nothing there. The first server keeps every
//! acknowledged message, across a restart, and delivers each once to a real Postfix primary.
//! (Before the lock, the second server's recovery deleted the first's active segment: the
//! first went on writing into a deleted file, and its acknowledged mail was gone after a
//! restart.)

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use backupmx_tests::{
    MxPod, MxPodConfig, Primary, free_port, mxpod_bin, send_all, state_dir, with_tag,
};

/// Every file under `dir`: path -> (inode, size, mtime in ns). Any creation, deletion,
/// replacement or write shows.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, u64, i128)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            let mtime = i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec());
            out.insert(e.path().display().to_string(), (m.ino(), m.len(), mtime));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_queue_is_refused_and_nothing_acknowledged_is_lost() {
    let primary = Primary::start();
    // workers 0: the acknowledged mail stays in A's queue until the end
    let mut a = MxPod::start(MxPodConfig::new(&primary.addr())).await;
    send_all(a.smtp, "alice@sender.test", "writer", 0..5, 2000).await;
    let before = snapshot(&a.queue_dir);
    assert!(
        before.keys().any(|p| p.ends_with(".seg")),
        "A has segments: {before:?}"
    );

    // B: A's configuration with other SMTP and admin ports, the same queue directory
    let b_dir = state_dir("second");
    let text = fs::read_to_string(&a.config_path).unwrap();
    let a_admin = a.admin.trim_start_matches("http://").to_owned();
    let b_smtp = format!("127.0.0.1:{}", free_port());
    let b_admin = format!("127.0.0.1:{}", free_port());
    let b_text = text
        .replace(&a.smtp.to_string(), &b_smtp)
        .replace(&a_admin, &b_admin);
    assert_ne!(b_text, text, "B listens elsewhere");
    let b_config = b_dir.path().join("mx-pod.toml");
    fs::write(&b_config, b_text).unwrap();
    let b_log = b_dir.path().join("mx-pod.log");
    let mut b = Command::new(mxpod_bin())
        .args(["serve", "--config"])
        .arg(&b_config)
        .env("MXPOD_LOG_FORMAT", "text")
        .stdout(Stdio::null())
        .stderr(fs::File::create(&b_log).unwrap())
        .spawn()
        .expect("run mx-pod serve");
    let started = Instant::now();
    let status = loop {
        if let Some(s) = b.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = b.kill();
            let _ = b.wait();
            panic!(
                "B is serving the same queue directory:\n{}",
                fs::read_to_string(&b_log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = fs::read_to_string(&b_log).unwrap_or_default();
    assert!(!status.success(), "B must not serve: {stderr}");
    let pid = a.pid().expect("A runs");
    let expected = format!(
        "queue directory {} is in use by another mx-pod (PID {pid} holds {}/lock)",
        a.queue_dir.display(),
        a.queue_dir.display()
    );
    assert!(stderr.contains(&expected), "{expected:?} in:\n{stderr}");
    assert_eq!(
        snapshot(&a.queue_dir),
        before,
        "B created, deleted or changed nothing in the queue directory"
    );
    for addr in [&b_smtp, &b_admin] {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "B never listened on {addr}"
        );
    }

    // A goes on: more mail, then a restart, then replay
    send_all(a.smtp, "alice@sender.test", "writer", 5..10, 2000).await;
    a.sigterm();
    assert!(a.wait_exit(Duration::from_secs(30)).await.success());
    a.restart().await;
    assert_eq!(a.queued().await, 10, "every acknowledged message is back");
    a.set_replay(2, 0).await;
    a.wait_empty(Duration::from_secs(60)).await;
    let order = with_tag(&primary.received_order(), "writer");
    let expected: Vec<String> = (0..10).map(|i| format!("writer.{i}@test")).collect();
    assert_eq!(order, expected, "each once, in arrival order");
}
