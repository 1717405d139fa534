//! Slow and silent peers cannot pin resources, and memory stays bounded whatever the clients
//! send. SMTP deadlines are per command and per DATA transfer, not per read: a client trickling
//! one byte at a time is closed. A client that never reads its replies is closed. The admin
//! API bounds its connections and the time to send a request head, so a flood of half-open
//! admin connections does not starve SMTP. Message bodies in transit share one memory budget
//! (`smtp.max_inflight_data`): sessions beyond it wait, or get `451 4.3.2`, and the server's
//! peak memory stays near the budget.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use backupmx_tests::{MxPod, MxPodConfig, Sink, message, realparts::Smtp, send, wait_for};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Reads until the server closes the connection (EOF or reset) or `limit` passes; returns what
/// was read, or `None` when the connection was still open at `limit`.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut got = Vec::new();
    let end = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(String::from_utf8_lossy(&got).into_owned()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// Sends `bytes` one at a time, `gap` apart, until the server closes or all are sent; returns
/// whether the server closed the connection while they trickled in.
async fn trickle(s: &mut TcpStream, bytes: &[u8], gap: Duration) -> bool {
    for b in bytes {
        if s.write_all(&[*b]).await.is_err() {
            return true;
        }
        tokio::time::sleep(gap).await;
    }
    false
}

fn pod_config(sink: &Sink, smtp_extra: &str) -> MxPodConfig {
    let mut cfg = MxPodConfig::new(&sink.addr());
    cfg.smtp_extra.push_str(smtp_extra);
    cfg
}

/// With messages of up to `max` (and that much memory for all in transit).
fn big_config(sink: &Sink, max: &str, smtp_extra: &str) -> MxPodConfig {
    let mut cfg = pod_config(sink, smtp_extra);
    cfg.max_message_size = max.into();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_a_command_or_its_data_is_closed_at_the_deadline() {
    let sink = Sink::start(&[], 0, false).await;
    let pod = MxPod::start(pod_config(
        &sink,
        "idle_timeout = \"2s\"\ndata_timeout = \"3s\"\n",
    ))
    .await;

    // a command line, one byte every 300 ms: every read is quick, the line never completes
    let mut s = TcpStream::connect(pod.smtp).await.unwrap();
    let mut banner = [0u8; 256];
    let _ = s.read(&mut banner).await.unwrap();
    let line = b"EHLO a-very-slow-client.example.test\r\n";
    // (11 s for the line: far past the 2 s a command may take, though no read waits 2 s)
    let closed = trickle(&mut s, line, Duration::from_millis(300)).await;
    let rest = until_closed(&mut s, Duration::from_secs(20)).await;
    assert!(
        closed,
        "the trickling command was not cut off while it trickled: {rest:?}"
    );
    if let Some(text) = rest {
        // the line was never taken (an idle time-out after a 250 is what a per-read limit gives)
        assert!(!text.contains("250"), "{text:?}");
        assert!(text.contains("421 4.4.2"), "{text:?}");
    }

    // DATA, one byte every 200 ms
    let mut c = Smtp::connect(pod.smtp).await;
    c.expect("EHLO client.test", "250").await;
    c.expect("MAIL FROM:<a@sender.test>", "250").await;
    c.expect("RCPT TO:<user@example.test>", "250").await;
    c.expect("DATA", "354").await;
    let started = Instant::now();
    let body = "Subject: slow\r\n\r\n".repeat(10);
    let mut closed = false;
    for b in body.bytes() {
        if c.try_write(&[b]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    let reply = c.try_reply().await;
    // cut off while it trickled (34 s of body against a 3 s DATA time-out), not only by the
    // idle time-out once it stopped
    assert!(
        closed,
        "the trickling DATA was not cut off while it trickled: {reply:?}"
    );
    assert!(
        reply.as_ref().is_err() || reply.as_ref().is_ok_and(|r| r.starts_with("421 4.4.2")),
        "the trickling DATA was cut off with 421 4.4.2: {reply:?}"
    );
    assert_eq!(pod.queued().await, 0);
    wait_for("both timeouts counted", Duration::from_secs(10), || async {
        pod.metric("mxpod_rejected_total{reason=\"timeout\"}").await >= 2.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies_is_closed() {
    let sink = Sink::start(&[], 0, false).await;
    let pod = MxPod::start(pod_config(
        &sink,
        "write_timeout = \"2s\"\nmax_errors = 1000000\n",
    ))
    .await;
    let mut s = TcpStream::connect(pod.smtp).await.unwrap();
    // NOOPs without ever reading: the replies fill both socket buffers, then the server's
    // writes block until its write timeout. Bounded: at most 64 MiB of commands.
    let chunk = b"NOOP\r\n".repeat(10_000);
    let mut closed = false;
    for _ in 0..(64 << 20) / chunk.len() {
        match tokio::time::timeout(Duration::from_secs(30), s.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => break, // our own writes block: the server stopped reading
        }
    }
    if !closed {
        // the server has stopped reading; it must close the connection
        closed = until_closed(&mut s, Duration::from_secs(30))
            .await
            .is_some();
    }
    assert!(closed, "a client that never reads was not closed");
    wait_for("the log line", Duration::from_secs(10), || async {
        pod.log_text().contains("client does not read its replies")
    })
    .await;
    // the server is fine
    let r = send(
        pod.smtp,
        "a@sender.test",
        &["user@example.test"],
        &message("after", 0, 200),
    )
    .await
    .unwrap();
    assert!(r.ok(), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admin_connections_do_not_starve_smtp_and_are_closed() {
    let sink = Sink::start(&[], 0, false).await;
    let pod = MxPod::start(pod_config(&sink, "")).await;
    let admin: SocketAddr = pod.admin.trim_start_matches("http://").parse().unwrap();
    // 300 connections that send nothing, and 50 that send half a request head
    let mut held = Vec::new();
    for i in 0..350 {
        let mut c = TcpStream::connect(admin).await.unwrap();
        if i >= 300 {
            c.write_all(b"GET /v1/queue HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        held.push(c);
    }
    // SMTP still takes mail, and the admin API still answers (beyond its 64 connections the
    // rest wait in the backlog; the silent ones are closed after the header timeout)
    let r = send(
        pod.smtp,
        "a@sender.test",
        &["user@example.test"],
        &message("flood", 0, 300),
    )
    .await
    .unwrap();
    assert!(r.ok(), "SMTP during the admin flood: {r:?}");
    wait_for(
        "the admin API to answer during the flood",
        Duration::from_secs(120),
        || async { pod.queued().await == 1 },
    )
    .await;
    // every held connection is closed by the server (header timeout), none stays open
    let mut open = 0;
    for c in held.iter_mut() {
        if until_closed(c, Duration::from_secs(60)).await.is_none() {
            open += 1;
        }
    }
    assert_eq!(open, 0, "half-open admin connections closed by the server");
    assert!(
        pod.log_text().contains("fd_limit"),
        "the open-files limit is logged at start:\n{}",
        pod.log_text()
    );
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_at_once_share_the_memory_budget_and_all_arrive() {
    let sink = Sink::start(&[], 0, false).await;
    // 24 sessions x 6 MiB at once; room for one such message at a time (10 MiB: a 7 MiB
    // large grant and 3 MiB for small messages): they take turns
    let pod = MxPod::start(big_config(&sink, "7MiB", "max_inflight_data = \"10MiB\"\n")).await;
    let sends = (0..24).map(|i| {
        let addr = pod.smtp;
        tokio::spawn(async move {
            send(
                addr,
                "a@sender.test",
                &["user@example.test"],
                &message("big", i, 6 << 20),
            )
            .await
        })
    });
    let results = futures_join(sends.collect()).await;
    for r in &results {
        let r = r.as_ref().expect("a reply to DATA");
        assert!(r.ok(), "every message waits its turn and is queued: {r:?}");
    }
    assert_eq!(pod.queued().await, 24);
    let peak = peak_rss(pod.pid().unwrap());
    println!("peak RSS: {} MiB", peak >> 20);
    // 144 MiB arrived at once; with the 10 MiB budget the server held a few copies of one
    // message at most (measured: 52 MiB in a debug build; without the budget over 100 MiB)
    assert!(
        peak < 64 << 20,
        "peak RSS {} MiB with a 10 MiB budget",
        peak >> 20
    );
    assert_eq!(
        pod.metric("mxpod_smtp_data_inflight_bytes").await,
        0.0,
        "all budget given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_get_memory_in_time_gets_451_and_the_holder_goes_on() {
    let sink = Sink::start(&[], 0, false).await;
    let pod = MxPod::start(big_config(
        &sink,
        "4MiB",
        "max_inflight_data = \"5MiB\"\ndata_timeout = \"6s\"\n",
    ))
    .await;
    // A declares 4 MiB (the one large grant) and stops half-way through its data
    let mut a = Smtp::connect(pod.smtp).await;
    a.expect("EHLO a.test", "250").await;
    a.expect("MAIL FROM:<a@sender.test> SIZE=4000000", "250")
        .await;
    a.expect("RCPT TO:<user@example.test>", "250").await;
    a.expect("DATA", "354").await;
    a.write(b"Subject: holder\r\n\r\nfirst half\r\n").await;
    // B's 1 MiB finds no memory for 3 s (half the DATA time): 451 4.3.2 at its end of data
    let b = send(
        pod.smtp,
        "b@sender.test",
        &["user@example.test"],
        &message("waiter", 0, 1 << 20),
    )
    .await
    .unwrap();
    assert!(b.reply.starts_with("451 4.3.2"), "{b:?}");
    // A finishes: queued
    a.write(b"second half\r\n.\r\n").await;
    let r = a.reply().await;
    assert!(r.starts_with("250"), "{r}");
    assert_eq!(pod.queued().await, 1);
    assert_eq!(
        pod.metric("mxpod_rejected_total{reason=\"busy\"}").await,
        1.0
    );
}

/// Awaits every task.
async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}
