//! Replay against the scripted SMTP server (`outbound::script`) on 127.0.0.1, under tokio's
//! paused clock: backoffs, the rate and slow primaries cost no real time, and the waits are
//! exact.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::*;
use crate::outbound::script::{Answer, Script, Seen, scripted_live, send};
use crate::queue::message::{Envelope, MessageKind, QueueId};

const ROUTE: &str = "example.test";

/// A replay of a fresh queue towards `primary` for `example.test`, with these lines added to
/// `[replay]` (`min_backoff` is 30 s, `max_backoff` 1 h); started by [`Harness::start`].
struct Harness {
    replay: Replay,
    queue: Queue,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(primary: &str, replay: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "hostname = \"mx2.example.test\"\n[queue]\ndir = \"{}\"\n[replay]\nmin_backoff = \"30s\"\nmax_backoff = \"1h\"\n{replay}\n[[domains]]\nname = \"{ROUTE}\"\nprimary = \"{primary}\"\n",
            dir.path().display()
        );
        let config = Arc::new(Config::parse(&text, "test").unwrap());
        let (queue, _) = Queue::open(&config.queue).unwrap();
        let metrics = Arc::new(Metrics::new());
        Harness {
            replay: Replay::new(config, queue.clone(), metrics.clone(), Trust::webpki()),
            queue,
            metrics,
            shutdown: CancellationToken::new(),
            _dir: dir,
        }
    }

    fn start(&self) {
        self.replay
            .spawn(&TaskTracker::new(), self.shutdown.clone());
    }

    /// Queues message `n`: from `m<n>@sender.test` to `rcpts`.
    async fn enqueue_to(&self, n: usize, rcpts: &[&str]) -> QueueId {
        let env = Envelope::for_test(self.queue.new_id().0, &format!("m{n}@sender.test"), rcpts);
        let body = format!("Subject: {n}\r\n\r\nmessage {n}\r\n").into_bytes();
        let reservation = self.queue.reserve(body.len() as u64).unwrap();
        self.queue.enqueue(env, body, reservation).await.unwrap()
    }

    /// Queues messages `1..=n` to `u@example.test`.
    async fn enqueue(&self, n: usize) -> Vec<QueueId> {
        let mut ids = Vec::new();
        for i in 1..=n {
            ids.push(self.enqueue_to(i, &["u@example.test"]).await);
        }
        ids
    }

    fn route(&self) -> RouteStatus {
        self.replay
            .routes()
            .into_iter()
            .find(|r| r.route == ROUTE)
            .unwrap()
    }

    fn in_flight(&self) -> usize {
        let stats = self.queue.stats();
        stats
            .iter()
            .find(|s| s.route == ROUTE)
            .map_or(0, |s| s.in_flight)
    }

    /// The mail (not DSNs) still queued, oldest first.
    fn queued(&self) -> Vec<QueueId> {
        let list = self.queue.list(None, 100);
        list.iter()
            .filter(|e| e.kind == MessageKind::Mail)
            .map(|e| e.id)
            .collect()
    }

    /// `mxpod_bounced_total{reason}`.
    fn bounced(&self, reason: &str) -> u64 {
        let label = ReasonLabel {
            reason: reason.into(),
        };
        self.metrics.bounced.get_or_create(&label).get()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Waits (in virtual time, 10 ms a step) until `done`; fails the test after `within`.
async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        sleep(Duration::from_millis(10)).await;
    }
}

/// The senders of the messages the primary received the final dot of, in that order.
fn committed(seen: &Mutex<Seen>) -> Vec<String> {
    let seen = seen.lock().unwrap();
    let sender = |mail: &String| mail.split(['<', '>']).nth(1).unwrap_or_default().to_owned();
    seen.committed.iter().map(sender).collect()
}

fn count(seen: &Mutex<Seen>, verb: &str) -> usize {
    let seen = seen.lock().unwrap();
    seen.commands.iter().filter(|c| c.starts_with(verb)).count()
}

fn connections(seen: &Mutex<Seen>) -> usize {
    seen.lock().unwrap().connections
}

/// A primary that hangs up on every connection until its script is changed.
async fn primary_down() -> (String, Arc<Mutex<Seen>>, Arc<Mutex<Script>>) {
    let down = Script {
        greeting: Answer::Close,
        ..Script::default()
    };
    scripted_live(down).await
}

fn late(after: u64, reply: &[u8]) -> Answer {
    Answer::Late(Duration::from_secs(after), reply.to_vec())
}

#[tokio::test(start_paused = true)]
async fn a_younger_message_is_not_committed_before_an_older_one() {
    // the primary takes 30 s to commit each message
    let dot = late(30, b"250 2.0.0 Ok: queued\r\n");
    let (addr, seen, _) = scripted_live(Script {
        dot,
        ..Script::default()
    })
    .await;
    let h = Harness::new(&addr, "workers = 2\nrate_per_second = 0");
    h.enqueue(2).await;
    let t0 = Instant::now();
    h.start();

    // both are transferred side by side; only the older one's dot goes out
    let second = Duration::from_secs(1);
    until("both at DATA", second, || count(&seen, "DATA") == 2).await;
    sleep_until(t0 + Duration::from_secs(29)).await;
    assert_eq!(h.in_flight(), 2);
    assert_eq!(
        committed(&seen),
        ["m1@sender.test"],
        "m2 waits for its turn"
    );

    // m1 is committed at 30 s: m2's turn, committed at 60 s
    let minutes = Duration::from_secs(120);
    until("delivered", minutes, || h.queued().is_empty()).await;
    assert!(
        t0.elapsed() >= Duration::from_secs(60),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(committed(&seen), ["m1@sender.test", "m2@sender.test"]);
    assert_eq!(connections(&seen), 2, "in parallel, on two connections");
}

#[tokio::test(start_paused = true)]
async fn a_failed_route_backs_off_and_keeps_its_mail_at_the_head() {
    let (addr, seen, script) = primary_down().await;
    let h = Harness::new(&addr, "workers = 1\nrate_per_second = 0");
    let ids = h.enqueue(2).await;
    let t0 = Instant::now();
    h.start();

    until("a route failure", Duration::from_secs(1), || {
        h.route().backing_off
    })
    .await;
    let route = h.route();
    assert!(route.last_error.is_some(), "{route:?}");
    assert_eq!(h.queued(), ids, "both still queued, in order");
    let untouched = h.queue.list(None, 10);
    assert!(untouched.iter().all(|e| e.recipients[0].attempts == 0));
    let first = connections(&seen);
    assert_eq!(first, 1);

    // no try while it backs off (30 s), one after it; the next wait is twice as long
    sleep_until(t0 + Duration::from_secs(29)).await;
    assert_eq!(connections(&seen), first, "nothing during the backoff");
    until("a second try", Duration::from_secs(2), || {
        connections(&seen) > first
    })
    .await;
    let second = connections(&seen);
    sleep_until(t0 + Duration::from_secs(30 + 59)).await;
    assert_eq!(connections(&seen), second, "a backoff of 60 s now");

    // the primary is back: the next try delivers both, oldest first
    *script.lock().unwrap() = Script::default();
    until("delivered", Duration::from_secs(5), || {
        h.queued().is_empty()
    })
    .await;
    assert!(
        t0.elapsed() >= Duration::from_secs(90),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(committed(&seen), ["m1@sender.test", "m2@sender.test"]);
    assert!(!h.route().backing_off);
}

#[tokio::test(start_paused = true)]
async fn a_younger_message_waiting_for_its_turn_is_withdrawn_when_an_older_one_fails() {
    // the first connection is refused 20 s after it opens
    let (addr, seen, script) = scripted_live(Script {
        greeting: late(20, b"554 5.3.2 not now\r\n"),
        ..Script::default()
    })
    .await;
    let h = Harness::new(&addr, "workers = 1\nrate_per_second = 0");
    let ids = h.enqueue(2).await;
    h.start();
    until("m1 connecting", Duration::from_secs(1), || {
        connections(&seen) == 1
    })
    .await;
    // (queueing m2 only now would let the clock run while the log syncs)
    *script.lock().unwrap() = Script::default();
    h.replay.set_settings(ReplaySettings {
        workers: 2,
        rate_per_second: 0,
    });

    // m2 is transferred over a second connection and waits for m1 before its dot
    until("m2 at DATA", Duration::from_secs(1), || {
        count(&seen, "DATA") == 1
    })
    .await;
    sleep(Duration::from_secs(10)).await;
    assert_eq!(h.in_flight(), 2);

    // m1 fails at 20 s: m2 is withdrawn before its dot, both wait out the backoff in order
    until("the route failure", Duration::from_secs(15), || {
        h.route().backing_off
    })
    .await;
    until("m2 withdrawn", Duration::from_secs(1), || {
        h.in_flight() == 0
    })
    .await;
    assert_eq!(seen.lock().unwrap().dots, 0, "m2 was not committed");
    assert_eq!(h.queued(), ids);

    until("delivered", Duration::from_secs(40), || {
        h.queued().is_empty()
    })
    .await;
    assert_eq!(committed(&seen), ["m1@sender.test", "m2@sender.test"]);
    assert_eq!(seen.lock().unwrap().dots, 2, "each committed once");
}

#[tokio::test(start_paused = true)]
async fn mail_for_a_primary_that_is_down_is_withheld_until_the_probe_finds_it_up() {
    let (addr, seen, script) = primary_down().await;
    let h = Harness::new(&addr, "workers = 2\nrate_per_second = 0\nauto = true");
    let ids = h.enqueue(1).await;
    h.start();

    // probed every 5 s and found down: the workers never try it
    sleep(Duration::from_secs(60)).await;
    assert!(connections(&seen) >= 10, "probed");
    let route = h.route();
    assert_eq!(route.primary_up, Some(false));
    assert!(
        !route.backing_off && route.last_error.is_none(),
        "{route:?}"
    );
    assert_eq!(h.queued(), ids);

    // up at the next probe: delivered
    *script.lock().unwrap() = Script::default();
    until("delivered", Duration::from_secs(6), || {
        h.queued().is_empty()
    })
    .await;
    assert_eq!(h.route().primary_up, Some(true));
    assert_eq!(committed(&seen), ["m1@sender.test"]);
}

#[tokio::test(start_paused = true)]
async fn the_rate_spaces_deliveries_evenly() {
    let (addr, seen, _) = scripted_live(Script::default()).await;
    let h = Harness::new(&addr, "workers = 4\nrate_per_second = 10");
    h.enqueue(21).await;
    let t0 = Instant::now();
    h.start();

    // 10 a second: the first at once, the 21st 2 s later
    until("delivered", Duration::from_secs(5), || {
        h.queued().is_empty()
    })
    .await;
    let took = t0.elapsed();
    let (at_least, at_most) = (Duration::from_secs(2), Duration::from_millis(2100));
    assert!(took >= at_least && took < at_most, "{took:?}");
    assert_eq!(committed(&seen).len(), 21);
}

#[tokio::test(start_paused = true)]
async fn after_421s_the_route_gets_one_delivery_at_a_time_then_ramps_back_up() {
    // every transaction takes a second (MAIL is answered late), so concurrency shows
    let slow = Script {
        mail: late(1, b"250 2.1.0 Ok\r\n"),
        ..Script::default()
    };
    let (addr, seen, script) = scripted_live(Script {
        greeting: send(b"421 4.7.0 too busy\r\n"),
        ..slow.clone()
    })
    .await;
    let h = Harness::new(&addr, "workers = 4\nrate_per_second = 0");
    h.enqueue(24).await;
    h.start();

    // four at once, each told 421: the route's concurrency halves down to one
    until("throttled", Duration::from_secs(1), || {
        connections(&seen) == 4
    })
    .await;
    until("limited", Duration::from_secs(1), || {
        h.route().concurrency_limit == Some(1)
    })
    .await;
    *script.lock().unwrap() = slow;

    // after the backoff: one at a time, then one more per success (additive increase), back to
    // all four workers once the limit reaches them
    let backoff = Duration::from_secs(30 * 8);
    until("the backoff ends", backoff + Duration::from_secs(2), || {
        h.in_flight() > 0
    })
    .await;
    let t = Instant::now();
    let mut ramp = Vec::new();
    for s in 0..6 {
        sleep_until(t + Duration::from_millis(500 + 1000 * s)).await;
        ramp.push((h.in_flight(), h.route().concurrency_limit));
    }
    let expected = [
        (1, Some(1)),
        (2, Some(2)),
        (3, Some(2)),
        (4, Some(3)),
        (4, None),
        (4, None),
    ];
    assert_eq!(ramp, expected, "(in flight, limit) each second");
    until("delivered", Duration::from_secs(10), || {
        h.queued().is_empty()
    })
    .await;
    let want: Vec<String> = (1..=24).map(|i| format!("m{i}@sender.test")).collect();
    assert_eq!(committed(&seen), want);
}

#[tokio::test]
async fn a_damaged_message_is_bounced_and_counted_once_per_recipient_as_corrupt() {
    let h = Harness::new("127.0.0.1:9", "workers = 0");
    let rcpts = ["a@example.test", "b@example.test"];
    let id = h.enqueue_to(1, &rcpts).await;
    let job = h.queue.take(None, |_, _| true).unwrap();

    h.replay.damaged(&job, "checksum mismatch").await;

    assert_eq!(
        (h.bounced("corrupt"), h.bounced("rejected")),
        (2, 0),
        "each recipient once, as corrupt (the primary refused nothing)"
    );
    assert!(h.queued().is_empty(), "it left the queue");
    let saved = h.queue.dir().join("corrupt").join(format!("{id}.json"));
    assert!(saved.exists(), "{saved:?}");
}
