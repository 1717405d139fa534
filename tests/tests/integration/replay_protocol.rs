//! Replay believes only a real commit. A scripted primary on 127.0.0.1 misbehaves in one way
//! per test (a `250` to DATA, a line after the greeting, two replies to one command, an
//! oversized reply, garbage, no reply to the final dot, a hang-up after the dot), then behaves:
//! it relays to a real Postfix. The misbehaviour must leave the queue untouched and back the
//! route off; in the end every acknowledged message reaches Postfix exactly once, in arrival
//! order. The exception is the one SMTP cannot avoid, a connection lost after the dot: it is
//! logged and counted as a possible duplicate, and a real one is shown with Postfix behind a
//! relay that loses its reply. A relay that holds Postfix's reply shows that a slow commit is
//! awaited, not sent twice; one that passes replies on byte by byte shows they still parse.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use backupmx_tests::{MxPod, MxPodConfig, Primary, free_port, message, send, wait_for, with_tag};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// How the scripted primary misbehaves, on every connection until told to behave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// `250` to DATA instead of `354`.
    Data250,
    /// A reply line right after the `220` greeting.
    LineAfterGreeting,
    /// MAIL answered twice (no PIPELINING offered: the client is in lockstep).
    TwoRepliesToMail,
    /// A reply to MAIL longer than any the client accepts.
    Oversized,
    /// A line that is no SMTP reply, to RCPT.
    Garbage,
    /// No reply to the final dot; the connection stays open.
    SilentAfterDot,
    /// The connection closed right after the final dot.
    CloseAfterDot,
}

/// What a behaving front does between mx-pod and Postfix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relay {
    /// Passes everything through.
    Plain,
    /// Passes Postfix's replies on one byte per write.
    Trickle,
    /// Loses Postfix's reply to the first final dot (after Postfix committed) and hangs up.
    LoseFirstDotReply,
    /// Holds Postfix's reply to the first final dot this long, then passes it on.
    HoldFirstDotReply(Duration),
}

/// What the scripted primary saw, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Event {
    /// Message data with this Message-ID began on connection `conn`.
    Data { conn: usize, id: String },
    /// The final dot of that message arrived.
    Dot { conn: usize, id: String },
    /// mx-pod closed connection `conn`.
    Closed { conn: usize },
}

struct State {
    upstream: String,
    fault: Option<Fault>,
    relay: Relay,
    behave: AtomicBool,
    /// Connections on which the fault was played.
    faults: AtomicUsize,
    /// The relay's one-time fault (lose or hold a reply) was played.
    fired: AtomicBool,
    events: Mutex<Vec<Event>>,
}

impl State {
    fn event(&self, e: Event) {
        self.events.lock().unwrap().push(e);
    }
}

/// The primary mx-pod delivers to: scripted and misbehaving until [`Front::behave`], then a
/// relay to Postfix.
struct Front {
    port: u16,
    state: Arc<State>,
}

impl Front {
    async fn start(upstream: String, fault: Option<Fault>, relay: Relay) -> Front {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let state = Arc::new(State {
            upstream,
            fault,
            relay,
            behave: AtomicBool::new(fault.is_none()),
            faults: AtomicUsize::new(0),
            fired: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        tokio::spawn(async move {
            let mut conn = 0;
            while let Ok((down, _)) = listener.accept().await {
                conn += 1;
                let _ = down.set_nodelay(true);
                let s = s.clone();
                match s.fault {
                    Some(f) if !s.behave.load(Ordering::SeqCst) => {
                        tokio::spawn(scripted(down, f, conn, s))
                    }
                    _ => tokio::spawn(relay_to_primary(down, s)),
                };
            }
        });
        Front { port, state }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn behave(&self) {
        self.state.behave.store(true, Ordering::SeqCst);
    }

    fn faults(&self) -> usize {
        self.state.faults.load(Ordering::SeqCst)
    }

    fn events(&self) -> Vec<Event> {
        self.state.events.lock().unwrap().clone()
    }
}

/// A reply to MAIL of 70 KiB in continuation lines (the client takes 4 KiB).
fn oversized() -> Vec<u8> {
    let mut r = Vec::new();
    while r.len() < 70 * 1024 {
        r.extend_from_slice(b"250-this reply goes on and on and on and on and on and on\r\n");
    }
    r.extend_from_slice(b"250 2.1.0 Ok\r\n");
    r
}

/// The misbehaving primary on one connection.
async fn scripted(stream: TcpStream, fault: Fault, conn: usize, s: Arc<State>) {
    let played = || s.faults.fetch_add(1, Ordering::SeqCst);
    let mut r = BufReader::new(stream);
    let greeting: &[u8] = if fault == Fault::LineAfterGreeting {
        played();
        b"220 fake.test ESMTP\r\n250 2.0.0 extra\r\n"
    } else {
        b"220 fake.test ESMTP\r\n"
    };
    if r.get_mut().write_all(greeting).await.is_err() {
        return;
    }
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            s.event(Event::Closed { conn });
            return;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: Vec<u8> = match (verb.as_str(), fault) {
            ("EHLO", Fault::TwoRepliesToMail) => b"250-fake.test\r\n250 8BITMIME\r\n".to_vec(),
            ("EHLO", _) => b"250-fake.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n".to_vec(),
            ("MAIL", Fault::TwoRepliesToMail) => {
                played();
                b"250 2.1.0 Ok\r\n250 2.1.0 Ok\r\n".to_vec()
            }
            ("MAIL", Fault::Oversized) => {
                played();
                oversized()
            }
            ("MAIL", _) => b"250 2.1.0 Ok\r\n".to_vec(),
            ("RCPT", Fault::Garbage) => {
                played();
                b"hello, this is not SMTP\r\n".to_vec()
            }
            ("RCPT", _) => b"250 2.1.5 Ok\r\n".to_vec(),
            ("DATA", Fault::Data250) => {
                played();
                b"250 2.0.0 Ok\r\n".to_vec()
            }
            ("DATA", _) => b"354 End data with <CR><LF>.<CR><LF>\r\n".to_vec(),
            ("RSET", _) => b"250 2.0.0 Ok\r\n".to_vec(),
            ("QUIT", _) => {
                let _ = r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await;
                return;
            }
            _ => b"502 5.5.2 Error: command not recognized\r\n".to_vec(),
        };
        if r.get_mut().write_all(&reply).await.is_err() {
            return;
        }
        if !reply.starts_with(b"354") {
            continue;
        }
        // message data, to the dot
        let mut id = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                s.event(Event::Closed { conn });
                return;
            }
            if line == ".\r\n" {
                break;
            }
            if id.is_empty()
                && let Some(m) = line.strip_prefix("Message-ID: <")
            {
                id = m.trim_end().trim_end_matches('>').to_owned();
                s.event(Event::Data {
                    conn,
                    id: id.clone(),
                });
            }
        }
        s.event(Event::Dot { conn, id });
        match fault {
            Fault::SilentAfterDot => {
                played();
                // no reply, ever; read on until mx-pod gives up and closes
                let mut rest = Vec::new();
                let _ = r.read_to_end(&mut rest).await;
                s.event(Event::Closed { conn });
                return;
            }
            Fault::CloseAfterDot => {
                played();
                s.event(Event::Closed { conn });
                return;
            }
            _ => {
                if r.get_mut().write_all(b"250 2.0.0 Ok\r\n").await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The behaving primary: a relay to Postfix, playing `s.relay` on the way back.
async fn relay_to_primary(down: TcpStream, s: Arc<State>) {
    let Ok(up) = TcpStream::connect(&s.upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let (mut down_r, mut down_w) = down.into_split();
    let (mut up_r, mut up_w) = up.into_split();
    // final dots forwarded to Postfix on this connection; its replies answer them in order
    let dots = Arc::new(AtomicUsize::new(0));
    let seen = dots.clone();
    let to_primary = tokio::spawn(async move {
        let mut buf = [0u8; 8192];
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = match down_r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            tail.extend_from_slice(&buf[..n]);
            // "\r\n.\r\n" ends message data; nothing else in SMTP contains it
            let ends = tail.windows(5).filter(|w| w == b"\r\n.\r\n").count();
            if ends > 0 {
                seen.fetch_add(ends, Ordering::SeqCst);
            }
            let keep = tail.len().saturating_sub(4);
            tail.drain(..keep);
            if up_w.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = up_w.shutdown().await;
    });
    let mut buf = [0u8; 8192];
    loop {
        let n = match up_r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Postfix answers a dot only after it committed the message
        let dot_reply = dots.load(Ordering::SeqCst) > 0;
        let once = || dot_reply && !s.fired.swap(true, Ordering::SeqCst);
        match s.relay {
            Relay::LoseFirstDotReply if once() => {
                to_primary.abort();
                return; // both halves dropped: mx-pod sees the connection close
            }
            Relay::HoldFirstDotReply(hold) if once() => tokio::time::sleep(hold).await,
            _ => {}
        }
        let ok = if s.relay == Relay::Trickle {
            let mut ok = true;
            for b in &buf[..n] {
                ok = ok && down_w.write_all(&[*b]).await.is_ok();
            }
            ok
        } else {
            down_w.write_all(&buf[..n]).await.is_ok()
        };
        if !ok {
            break;
        }
    }
    to_primary.abort();
}

/// Sends `n` messages tagged `tag` while replay holds everything; returns their Message-IDs
/// and mx-pod queue IDs, in order.
async fn queue(pod: &MxPod, tag: &str, n: usize) -> (Vec<String>, Vec<String>) {
    let mut sent = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let r = send(
            pod.smtp,
            "sender@sender.test",
            &["user@example.test"],
            &message(tag, i, 2000),
        )
        .await
        .unwrap();
        assert!(r.ok(), "{tag}.{i}: {r:?}");
        sent.push(format!("{tag}.{i}@test"));
        ids.push(r.reply.rsplit(' ').next().unwrap().to_owned());
    }
    (sent, ids)
}

/// A lost reply to the final dot: no second copy went out while a dot was pending, the
/// possible duplicate is logged with its queue id, and counted as an unknown outcome.
async fn assert_possible_duplicate(pod: &MxPod, events: &[Event], id: &str) {
    assert_no_copy_while_a_dot_is_pending(events);
    let log = pod.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(POSSIBLE_DUPLICATE) && l.contains(id)),
        "the possible duplicate is logged with its message:\n{log}"
    );
    assert!(pod.metric(UNKNOWN).await >= 2.0);
}

const UNKNOWN: &str = "mxpod_replay_unknown_outcome_total{domain=\"example.test\"}";
const POSSIBLE_DUPLICATE: &str = "possible duplicate: connection lost after the final dot";

/// Plays `fault` until it has been played `rounds` times, checks that the queue is untouched
/// and the route backs off with an error containing `error`, then lets the front behave and
/// checks that Postfix committed every message exactly once, in order. Returns the pod and the
/// front for further checks.
async fn misbehave_then_behave(
    tag: &str,
    fault: Fault,
    error: &str,
    replay_extra: &str,
) -> (MxPod, Front, Vec<String>) {
    const N: usize = 5;
    const ROUNDS: usize = 2;
    let primary = Primary::start();
    let front = Front::start(primary.addr(), Some(fault), Relay::Plain).await;
    let mut cfg = MxPodConfig::new(&front.addr());
    cfg.replay_extra = replay_extra.into();
    let pod = MxPod::start(cfg).await;
    let (sent, ids) = queue(&pod, tag, N).await;

    pod.set_replay(3, 0).await;
    wait_for(
        "the fault to be played twice and the route to back off",
        Duration::from_secs(60),
        || async {
            front.faults() >= ROUNDS
                && pod.route("example.test").await["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains(error))
        },
    )
    .await;
    assert_eq!(
        pod.queued().await,
        N as u64,
        "nothing was taken for delivered"
    );
    let (_, list) = pod.get("/v1/queue/messages?domain=example.test").await;
    let list = list.as_array().expect("a message list").clone();
    assert_eq!(list.len(), N);
    for m in &list {
        assert_eq!(m["recipients"][0]["status"], "pending", "untouched: {m}");
        assert_eq!(
            m["recipients"][0]["attempts"], 0,
            "a route failure, not a recipient attempt: {m}"
        );
    }
    assert_eq!(
        pod.metric("mxpod_delivered_total{domain=\"example.test\"}")
            .await,
        0.0
    );

    front.behave();
    let (code, _) = pod
        .call(reqwest::Method::POST, "/v1/queue/flush", None, true)
        .await;
    assert_eq!(code, 200);
    pod.wait_empty(Duration::from_secs(60)).await;
    assert_eq!(
        with_tag(&primary.received_order(), tag),
        sent,
        "Postfix committed every message exactly once, in arrival order"
    );
    (pod, front, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_250_to_data_is_not_a_delivery() {
    let (pod, ..) = misbehave_then_behave(
        "data250",
        Fault::Data250,
        "protocol error at DATA: unexpected reply 250",
        "",
    )
    .await;
    assert_eq!(pod.metric(UNKNOWN).await, 0.0, "no dot was ever sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_after_the_greeting_is_a_protocol_error() {
    misbehave_then_behave(
        "greeting",
        Fault::LineAfterGreeting,
        "protocol error at EHLO: unsolicited data",
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replies_to_one_command_are_a_protocol_error() {
    misbehave_then_behave(
        "tworeplies",
        Fault::TwoRepliesToMail,
        "protocol error at RCPT: unsolicited data",
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_reply_is_a_protocol_error() {
    misbehave_then_behave(
        "oversized",
        Fault::Oversized,
        "protocol error at MAIL: reply longer than",
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_a_protocol_error() {
    misbehave_then_behave(
        "garbage",
        Fault::Garbage,
        "protocol error at RCPT: malformed reply line",
        "",
    )
    .await;
}

/// No message goes out on a new connection while an old one that got its dot is still open:
/// the old one could still commit it.
fn assert_no_copy_while_a_dot_is_pending(events: &[Event]) {
    let mut pending: Vec<(usize, String)> = Vec::new();
    for e in events {
        match e {
            Event::Dot { conn, id } => pending.push((*conn, id.clone())),
            Event::Closed { conn } => pending.retain(|(c, _)| c != conn),
            Event::Data { conn, id } => assert!(
                !pending.iter().any(|(c, i)| i == id && c != conn),
                "{id} sent on connection {conn} while connection {pending:?} may still commit it: {events:?}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_to_the_final_dot_is_a_possible_duplicate_sent_again_only_after_closing() {
    let (pod, front, ids) = misbehave_then_behave(
        "silent",
        Fault::SilentAfterDot,
        "connection lost after the final dot (timed out after 1s waiting for the reply to the final dot)",
        "final_reply_timeout = \"1s\"\n",
    )
    .await;
    let events = front.events();
    assert!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Dot { id, .. } if id == "silent.0@test"))
            .count()
            >= 2,
        "the oldest message was sent again: {events:?}"
    );
    assert_possible_duplicate(&pod, &events, &ids[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_after_the_final_dot_is_a_possible_duplicate() {
    let (pod, front, ids) = misbehave_then_behave(
        "hangup",
        Fault::CloseAfterDot,
        "connection lost after the final dot (connection closed while waiting for the reply to the final dot)",
        "",
    )
    .await;
    assert_possible_duplicate(&pod, &front.events(), &ids[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_split_byte_by_byte_still_deliver_once_in_order() {
    let primary = Primary::start();
    let front = Front::start(primary.addr(), None, Relay::Trickle).await;
    let pod = MxPod::start(MxPodConfig::new(&front.addr())).await;
    let (sent, _) = queue(&pod, "trickle", 10).await;
    pod.set_replay(3, 0).await;
    pod.wait_empty(Duration::from_secs(60)).await;
    assert_eq!(with_tag(&primary.received_order(), "trickle"), sent);
    let log = pod.log_text();
    assert!(!log.contains("delivery failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_lost_after_a_real_commit_is_the_one_logged_duplicate() {
    let primary = Primary::start();
    let front = Front::start(primary.addr(), None, Relay::LoseFirstDotReply).await;
    let pod = MxPod::start(MxPodConfig::new(&front.addr())).await;
    let (sent, ids) = queue(&pod, "lost", 3).await;
    pod.set_replay(1, 0).await;
    pod.wait_empty(Duration::from_secs(60)).await;

    assert!(front.state.fired.load(Ordering::SeqCst), "a reply was lost");
    let mut expected = vec![sent[0].clone()];
    expected.extend(sent.iter().cloned());
    assert_eq!(
        with_tag(&primary.received_order(), "lost"),
        expected,
        "at least once: the message whose reply was lost is committed twice, the rest once, in order"
    );
    let log = pod.log_text();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(POSSIBLE_DUPLICATE))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(warned[0].contains(&ids[0]), "{}", warned[0]);
    assert_eq!(pod.metric(UNKNOWN).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_commit_is_awaited_not_sent_twice() {
    // the reply to the first dot comes three times replay.timeout late, well within
    // final_reply_timeout (10 minutes by default)
    let primary = Primary::start();
    let front = Front::start(
        primary.addr(),
        None,
        Relay::HoldFirstDotReply(Duration::from_secs(6)),
    )
    .await;
    let mut cfg = MxPodConfig::new(&front.addr());
    cfg.replay_timeout = "2s".into();
    let pod = MxPod::start(cfg).await;
    let (sent, _) = queue(&pod, "slow", 3).await;
    pod.set_replay(1, 0).await;
    pod.wait_empty(Duration::from_secs(60)).await;

    assert!(front.state.fired.load(Ordering::SeqCst), "a reply was held");
    assert_eq!(
        with_tag(&primary.received_order(), "slow"),
        sent,
        "committed once each: the late reply was awaited"
    );
    assert_eq!(pod.metric(UNKNOWN).await, 0.0);
    assert!(!pod.log_text().contains(POSSIBLE_DUPLICATE));
}
