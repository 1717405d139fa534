//! Commit order with several replay workers: the primary (real Postfix) commits each message in
//! arrival order even when the worker holding the oldest one is held up, and when that worker's
//! connection is lost, the younger ones waiting for their turn are withdrawn, not committed.
//!
//! A small TCP relay between mx-pod and Postfix plays the slow network: it holds the first
//! connection it accepts for a while, then either passes it through or hangs it up.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use backupmx_tests::{MxPod, MxPodConfig, Primary, free_port, send_all, with_tag};
use tokio::net::{TcpListener, TcpStream};

/// What the relay does with the first connection, after holding it for [`HOLD`].
#[derive(Clone, Copy)]
enum First {
    PassThrough,
    HangUp,
}

/// How long the first connection gets nothing: long enough for two workers on loopback to
/// deliver every other message many times over.
const HOLD: Duration = Duration::from_millis(1500);

/// Relays 127.0.0.1:port → `upstream`; returns the port and the count of connections seen.
async fn relay(upstream: String, first: First) -> (u16, Arc<AtomicUsize>) {
    let port = free_port();
    let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut down, _)) = listener.accept().await else {
                return;
            };
            let n = count.fetch_add(1, Ordering::SeqCst);
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if n == 0 {
                    tokio::time::sleep(HOLD).await;
                    if let First::HangUp = first {
                        return; // dropped: the worker sees the connection close before a greeting
                    }
                }
                let Ok(mut up) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            });
        }
    });
    (port, seen)
}

/// Queues `n` messages tagged `tag` while replay is held (workers 0), then lets 3 workers go;
/// returns what was sent, in order, once the queue is empty.
async fn queue_then_replay(pod: &MxPod, tag: &str, n: usize) -> Vec<String> {
    let sent = send_all(pod.smtp, "sender@sender.test", tag, 0..n, 2000).await;
    pod.set_replay(3, 0).await;
    pod.wait_empty(Duration::from_secs(60)).await;
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_connection_delays_the_others_instead_of_being_overtaken() {
    let primary = Primary::start();
    let (port, seen) = relay(primary.addr(), First::PassThrough).await;
    let pod = MxPod::start(MxPodConfig::new(&format!("127.0.0.1:{port}"))).await;

    let sent = queue_then_replay(&pod, "slow", 30).await;

    assert!(
        seen.load(Ordering::SeqCst) >= 2,
        "the workers delivered over several connections"
    );
    assert_eq!(
        with_tag(&primary.received_order(), "slow"),
        sent,
        "committed at the primary once each, in arrival order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn younger_messages_are_withdrawn_when_an_older_ones_connection_is_lost() {
    let primary = Primary::start();
    let (port, seen) = relay(primary.addr(), First::HangUp).await;
    let pod = MxPod::start(MxPodConfig::new(&format!("127.0.0.1:{port}"))).await;

    let sent = queue_then_replay(&pod, "lost", 30).await;

    assert!(
        seen.load(Ordering::SeqCst) >= 3,
        "the first connection was retried"
    );
    let log = pod.log_text();
    assert!(
        log.contains("connection closed while waiting for greeting"),
        "the hung-up connection is a route failure:\n{log}"
    );
    assert!(
        log.contains("withdrawn before commit"),
        "younger messages waiting for their turn were withdrawn:\n{log}"
    );
    assert_eq!(
        with_tag(&primary.received_order(), "lost"),
        sent,
        "committed at the primary once each (withdrawn ones were not), in arrival order"
    );
}
